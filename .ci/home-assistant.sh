#!/usr/bin/env bash
# A real Home Assistant for tests/test_homeassistant.py, in .venv-ha (idempotent; ~2 min the first time).
# Device-based MQTT discovery, which the agent publishes, needs Home Assistant 2024.11+, hence
# Python >= 3.12; this Debian (12) has 3.11. So the interpreter comes from Debian 13's own packages
# of the configured mirror, unpacked into .py313 (nothing is installed into the system) and
# patched with patchelf to use the loader and libraries it came with.
set -euo pipefail
cd "$(dirname "$0")/.."
HA_VERSION=${HA_VERSION:-2026.2.3}
ROOT=$PWD/.py313
PY=$ROOT/usr/bin/python3.13
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo

if ! "$PY" -c 'import ssl, sqlite3, ctypes' >/dev/null 2>&1; then
  command -v patchelf >/dev/null || { $SUDO apt-get update -qq && $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq patchelf >/dev/null; }
  # the mirror this machine's apt already uses, with Debian 13's suite
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/state/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs"
  echo "deb $uri trixie main" > "$tmp/sources.list"
  apt_opts=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o Dir::Etc::sourceparts=/nonexistent
            -o "Dir::State=$tmp/state" -o "Dir::Cache=$tmp/cache" -o "Dir::State::status=$tmp/state/status"
            -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" update -qq
  (cd "$tmp/debs" && apt-get "${apt_opts[@]}" download -qq \
    python3.13 python3.13-minimal libpython3.13-minimal libpython3.13-stdlib libpython3.13-dev python3.13-dev \
    libc6 gcc-14-base libgcc-s1 libstdc++6 libatomic1 libcrypt1 libexpat1 zlib1g libssl3t64 libffi8 libsqlite3-0 \
    libbz2-1.0 liblzma5 libzstd1 libmpdec4 libncursesw6 libtinfo6 libreadline8t64 libuuid1 libgdbm6t64 \
    libdb5.3t64 libnsl2 libtirpc3t64 media-types netbase tzdata python3-pip-whl python3-setuptools-whl)
  rm -rf "$ROOT"; mkdir -p "$ROOT"
  for d in "$tmp"/debs/*.deb; do dpkg-deb -x "$d" "$ROOT"; done
  lib=$ROOT/usr/lib/x86_64-linux-gnu
  patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$lib" "$PY"
  "$PY" -c 'import ssl, sqlite3, ctypes'
fi

if ! .venv-ha/bin/python -c "import homeassistant.const as c, sys; sys.exit(c.__version__ != '$HA_VERSION')" 2>/dev/null; then
  rm -rf .venv-ha
  "$PY" -m venv --without-pip .venv-ha
  whl=$(ls "$ROOT"/usr/share/python-wheels/pip-*.whl)
  .venv-ha/bin/python "$whl/pip" install -q --disable-pip-version-check "$whl"
  tmp=$(mktemp -d)
  .venv-ha/bin/pip download -q --no-deps -d "$tmp" "homeassistant==$HA_VERSION"
  (cd "$tmp" && unzip -q -o homeassistant-*.whl homeassistant/package_constraints.txt)
  # Home Assistant's own pins (without them pip backtracks for ages); Python.h for the sdists
  # among them comes from the unpacked headers.
  CFLAGS="-I$ROOT/usr/include" .venv-ha/bin/pip install -q --disable-pip-version-check \
    -c "$tmp/homeassistant/package_constraints.txt" "$tmp"/homeassistant-*.whl
  # the requirements of the integrations the test loads (Home Assistant would pip-install them at
  # first start; the test runs it with --skip-pip), read from their manifests
  .venv-ha/bin/python - > "$tmp/requirements.txt" <<'PY'
import json, pathlib, homeassistant.components as c
root, todo, seen, reqs = pathlib.Path(c.__path__[0]), ["mqtt", "mqtt_statestream", "frontend"], set(), set()
while todo:
    d = todo.pop()
    if d not in seen:
        seen.add(d)
        m = json.loads((root / d / "manifest.json").read_text())
        reqs.update(m.get("requirements", []))
        todo += m.get("dependencies", [])
print("\n".join(sorted(reqs)))
PY
  .venv-ha/bin/pip install -q --disable-pip-version-check -c "$tmp/homeassistant/package_constraints.txt" \
    -r "$tmp/requirements.txt"
  rm -rf "$tmp"
fi
echo "Home Assistant $HA_VERSION: $PWD/.venv-ha/bin/hass"
