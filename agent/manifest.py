"""The package manifest (``manifest.json``): its schema, limits and stable rejection reasons,
parsing and validation (the checks both the writer and the verifier apply), and the policy checks
a device applies to an authentic manifest (``check_validated``, ``check_newer``).

Imports only the standard library and ``prune_pack.errors``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Optional, Union

from prune_pack.errors import PackageRejected, UserInputError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MANIFEST_SCHEMA = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
SIGNATURE = "signature"
MEMBERS = (MANIFEST, MODEL, SIGNATURE)
REQUIRED_MEMBERS = (MANIFEST, MODEL)  # a missing signature is "unsigned", not "missing_member"

MiB = 1 << 20
DEFAULT_MAX_BYTES = 512 * MiB
MAX_MANIFEST_BYTES = 1 * MiB  # a manifest is a few KB; anything near this is an attack
MAX_SIGNATURE_BYTES = 1024
# Zip-bomb guard: ONNX weights compress by ~10 %, JSON by ~5x; 100x on a member over 1 MiB
# is never a real package.
MAX_COMPRESSION_RATIO = 100
BOMB_MIN_BYTES = 1 * MiB
_CHUNK = 1 * MiB

# Stable reason codes of PackageRejected (the MQTT answers and the dashboard show them).
REASONS = (
    "not_a_package",  # not a readable zip file (or not a regular file)
    "too_large",  # the package, or the sum of its declared member sizes, is over max_bytes
    "member_too_large",  # one member is over its limit (declared or while streaming)
    "zip_bomb",  # a member's compression ratio is implausible
    "bad_member_name",  # absolute path, '..', backslash, NUL, drive letter, empty part
    "link_member",  # a symlink (or other non-regular file) in the archive
    "duplicate_member",  # the same name twice
    "missing_member",  # manifest.json or model.onnx absent
    "unexpected_member",  # any member besides the three
    "unsupported_member",  # encrypted, or compressed with something other than stored/deflate
    "bad_manifest",  # not JSON, not an object, or a required field missing/ill-typed
    "unknown_schema",  # a manifest schema this agent does not understand
    "unsigned",  # no signature and unsigned packages are not allowed
    "bad_signature",  # malformed, or does not verify against the manifest
    "untrusted_key",  # signed by a key not among the trusted keys
    "revoked_key",  # signed by a revoked key
    "size_mismatch",  # model.onnx's size differs from the manifest's
    "hash_mismatch",  # model.onnx's sha256 (or the archive's CRC) differs
    "not_validated",  # check_validated: backend/precision combination not validated on the host
    "older_version",  # check_newer: not newer than the highest version of its name ever installed here (replay)
    "version_jump",  # check_newer: more than agent.max_version_jump above the highest installed version
    "expired",  # check_binding: the manifest's ``expires`` is in the past
    "wrong_device",  # check_binding: the manifest's ``devices`` / ``machine_ids`` do not name this device
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DEVICE_SEL_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127})(/(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127}))?$")
_MACHINE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_VERSION = 2**53 - 1  # exact in every JSON parser; 2**62 (which would block every later version) is refused
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_PRECISION_RE = re.compile(r"^[a-z0-9]{1,16}$")


def jsonable(v: Any) -> Any:
    """Manifest values as plain JSON: numpy scalars/arrays, tuples, Paths; NaN/inf -> null."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, (str, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if hasattr(v, "tolist"):  # numpy scalar or array, without importing numpy here
        return jsonable(v.tolist())
    raise UserInputError(f"manifest value {v!r} ({type(v).__name__}) is not JSON-serialisable")


def manifest_problem(m: Any) -> Optional[str]:
    """Why ``m`` is not a valid schema-1 manifest, or None (the checks both sides share)."""
    if not isinstance(m, dict):
        return "not a JSON object"

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    name = m.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return f"name must be 1-128 of letters, digits, '.', '_', '+', '-', got {name!r}"
    if not is_int(m.get("version")) or not 1 <= m["version"] <= MAX_VERSION:
        return f"version must be an integer in [1, {MAX_VERSION}], got {m.get('version')!r}"
    if not isinstance(m.get("sha256"), str) or not _SHA256_RE.match(m["sha256"]):
        return "sha256 must be 64 lowercase hex digits"
    if not is_int(m.get("size")) or m["size"] < 0:
        return f"size must be an integer >= 0, got {m.get('size')!r}"
    if not isinstance(m.get("precision"), str) or not _PRECISION_RE.match(m["precision"]):
        return f"precision must be a short lowercase word like fp32 or int8, got {m.get('precision')!r}"
    inp = m.get("input")
    if inp is not None:
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or not isinstance(inp.get("shape"), list):
            return "input must be an object with name (string) and shape (list)"
    names = m.get("names")
    if names is not None and not isinstance(names, (list, dict)):
        return "names must be a list (or an object id -> name)"
    val = m.get("validated")
    if val is not None:
        if not isinstance(val, list) or not all(
            isinstance(e, dict) and isinstance(e.get("backend"), str) and isinstance(e.get("precision"), str) for e in val
        ):
            return "validated must be a list of {backend, precision} objects"
    signer = m.get("signer")
    if signer is not None and not (isinstance(signer, str) and _KEY_ID_RE.match(signer)):
        return "signer must be a 16-hex-digit key id"
    if "expires" in m and parse_time(m["expires"]) is None:
        return "expires must be an ISO 8601 UTC time like 2027-01-31T00:00:00Z"
    for key, pattern in (("devices", _DEVICE_SEL_RE), ("machine_ids", _MACHINE_ID_RE)):
        v = m.get(key)
        if v is not None and not (isinstance(v, list) and v and all(isinstance(x, str) and pattern.match(x) for x in v)):
            return f"{key} must be a non-empty list of " + ("device ids or site/device selectors" if key == "devices" else "machine ids (32 hex digits)")
    return None


def parse_time(v: Any) -> Optional[float]:
    """Seconds since the epoch of an ISO 8601 time with a zone (``Z`` or ``+00:00``), else None."""
    if not isinstance(v, str) or len(v) > 40:
        return None
    try:
        t = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t.timestamp() if t.tzinfo is not None else None


def device_selected(selector: str, device_id: str, site: str) -> bool:
    if "/" not in selector:
        return selector == device_id
    s_site, s_dev = selector.split("/", 1)
    return s_site in ("*", site) and s_dev in ("*", device_id)


def check_binding(manifest: dict, device_id: str, site: str, machine_id: Optional[str], now: float) -> None:
    """Refuse a package past its ``expires``, or bound (``devices``, ``machine_ids``) to other devices.
    Not overridable by ``force``: an expired or foreign package needs a new signature."""
    exp = parse_time(manifest.get("expires"))
    if exp is not None and now > exp:
        raise PackageRejected("expired", f"{manifest.get('name')} v{manifest.get('version')} expired at {manifest['expires']}")
    devices = manifest.get("devices")
    if devices is not None and not any(device_selected(s, device_id, site) for s in devices):
        raise PackageRejected("wrong_device", f"the package is for {', '.join(devices[:5])}, this is {site}/{device_id}")
    machines = manifest.get("machine_ids")
    if machines is not None and machine_id not in machines:
        raise PackageRejected("wrong_device", "the package is bound to other machines (machine_ids)")


def onnx_input(path: Path) -> Optional[dict]:
    """The model's first input (name, shape, dtype) via ONNX Runtime, if it is installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure means this is not a usable model
        raise UserInputError(f"{path} is not a model ONNX Runtime can load: {str(e).splitlines()[0]}") from None
    i = sess.get_inputs()[0]
    dtype = i.type[len("tensor(") : -1] if i.type.startswith("tensor(") else i.type
    return {"name": i.name, "shape": list(i.shape), "dtype": {"float": "float32", "double": "float64"}.get(dtype, dtype)}


def read_manifest(path: Union[str, os.PathLike]) -> dict:
    """A package's (or a staged package folder's) manifest, *unverified*: for display only."""
    p = Path(path)
    if p.is_dir():
        f = p / MANIFEST
        if not f.is_file() or f.stat().st_size > MAX_MANIFEST_BYTES:
            raise PackageRejected("missing_member" if not f.is_file() else "member_too_large", str(f))
        return parse_manifest(f.read_bytes())
    try:
        with zipfile.ZipFile(p) as zf:
            try:
                info = zf.getinfo(MANIFEST)
            except KeyError:
                raise PackageRejected("missing_member", MANIFEST) from None
            with zf.open(info) as src:
                return parse_manifest(read_limited(src, MAX_MANIFEST_BYTES, MANIFEST))
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise PackageRejected("not_a_package", f"{p}: {e}") from None


def _reject_constant(c: str) -> Any:
    raise ValueError(f"{c} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    d: dict = {}
    for k, v in pairs:
        if k in d:  # two parsers could disagree on which value wins
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def parse_manifest(data: bytes) -> dict:
    try:
        m = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise PackageRejected("bad_manifest", f"not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise PackageRejected("bad_manifest", "not a JSON object")
    return m


def read_limited(src: IO[bytes], limit: int, name: str) -> bytes:
    data = src.read(limit + 1)
    if len(data) > limit:
        raise PackageRejected("member_too_large", f"{name}: more than {limit} bytes")
    return data


def check_validated(manifest: dict, backend: str, precision: Optional[str] = None, force: bool = False) -> str:
    """Refuse a backend/precision combination the host did not validate; returns the precision.

    ``precision`` None means the package's own. Without a ``validated`` list in the manifest only
    the package's own precision (on any backend) counts as validated. ``force`` skips the check.
    """
    own = manifest.get("precision")
    precision = precision or own
    if force:
        return str(precision)
    listed = manifest.get("validated")
    if listed is None:
        ok = precision == own
        allowed = f"{own} on any backend"
    else:
        ok = any(isinstance(e, dict) and e.get("backend") == backend and e.get("precision") == precision for e in listed)
        allowed = ", ".join(f"{e.get('backend')}/{e.get('precision')}" for e in listed if isinstance(e, dict)) or "nothing"
    if not ok:
        raise PackageRejected("not_validated", f"{backend}/{precision} was not validated on the host (validated: {allowed}); force to override")
    return str(precision)


def check_newer(manifest: dict, active: Optional[dict], force: bool = False, max_jump: Optional[int] = None) -> None:
    """Refuse a replayed or older package: same ``name`` needs a higher ``version`` than ``active``
    (on a device: the highest version of that name ever installed, ``ModelStore.highest``).

    Re-sending the very package installed at that version (same sha256) is allowed, so a retried
    deploy is idempotent; a different model name starts its own sequence. ``force`` (a signed
    command) allows a deliberate downgrade, never a jump of more than ``max_jump`` versions
    (a huge version would block every later one).
    """
    if not active or active.get("name") != manifest.get("name"):
        return
    new, cur = int(manifest["version"]), int(active.get("version", 0))
    if max_jump is not None and new > cur + max_jump:
        raise PackageRejected("version_jump", f"{manifest.get('name')} v{new} is more than {max_jump} versions above v{cur}")
    if force or new > cur or (new == cur and manifest.get("sha256") == active.get("sha256")):
        return
    raise PackageRejected("older_version", f"{manifest.get('name')} v{new} is not newer than v{cur} installed before; force to downgrade")


def class_names(manifest: dict) -> dict[int, str]:
    """The model's class names by index (``names`` as a list or a mapping; ``classes`` in old manifests)."""
    raw = manifest.get("names", manifest.get("classes"))
    if isinstance(raw, list):
        return {i: str(n) for i, n in enumerate(raw)}
    if isinstance(raw, dict):
        return {int(k): str(v) for k, v in raw.items() if str(k).isdigit()}
    return {}


def target_ms(manifest: dict) -> Optional[float]:
    """The package's latency target, ``target: {latency_ms, percentile}`` as the build writes it: what
    the device's telemetry, the dashboards' alerts and a rollout's default gate compare with."""
    t = manifest.get("target")
    v = t.get("latency_ms") if isinstance(t, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None
