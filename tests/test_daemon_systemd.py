"""The systemd unit: required settings present, and ``systemd-analyze verify`` accepts it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "prune-pack-agent.service"


def _service() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        values.setdefault(f"{section}.{k}", []).append(v)
    return values


def test_unit_has_notify_watchdog_and_hardening():
    s = _service()
    want = {"Service.Type": "notify", "Service.Restart": "on-failure", "Service.DynamicUser": "yes",
            "Service.StateDirectory": "prune-pack", "Service.ProtectSystem": "strict", "Service.NoNewPrivileges": "yes",
            "Service.PrivateTmp": "yes", "Service.ProtectHome": "yes", "Service.NotifyAccess": "main"}
    for k, v in want.items():
        assert s.get(k) == [v], k
    assert int(s["Service.WatchdogSec"][0]) > 0
    assert "agent run --config" in s["Service.ExecStart"][0]
    for k in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID",
              "LockPersonality", "RestrictNamespaces", "SystemCallFilter", "CapabilityBoundingSet"):
        assert f"Service.{k}" in s, k


def test_systemd_analyze_verify(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at this environment's entry point
    cli = Path(sys.executable).parent / "prune-pack"
    if not cli.exists():
        pytest.skip(f"{cli} is not installed (pip install -e .)")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/prune-pack/bin/prune-pack", str(cli)))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [l for l in (r.stdout + r.stderr).splitlines() if UNIT.name in l]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
