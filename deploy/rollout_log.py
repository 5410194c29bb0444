"""A rollout's memory: the append-only JSONL audit log on the host, the per-device states derived
from it, and the lock that tells a running rollout from a dead one.

The log is the source of truth: one line per action (``start``, ``skip``, ``deploy``, ``gate``,
``rollback``, ``abort``, ``resume``, ``finish``), each with who (user@host), when, the rollout id,
the package's sha256, the device, the result and why. Lines are only ever appended (``O_APPEND``,
flushed and fsynced one by one), so a host killed mid-rollout leaves a prefix of the truth, which
``rollout resume`` completes with the devices' retained status.
"""

from __future__ import annotations

import dataclasses
import fcntl
import getpass
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from prune_pack.errors import UserInputError

FINAL = ("skipped", "passed", "failed", "rolled_back", "rollback_failed")


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class AuditLog:
    """``{state_dir}/{rollout_id}.jsonl``; thread-safe appends."""

    def __init__(self, state_dir: str | Path, rid: str, package_sha256: str = "") -> None:
        self.dir = Path(state_dir).expanduser()
        self.rid = rid
        self.path = self.dir / f"{rid}.jsonl"
        self.package_sha256 = package_sha256
        self.by = who()
        self._lock = threading.Lock()
        self._lockfile: Any = None

    def append(self, action: str, device: Optional[str] = None, result: Optional[str] = None,
               why: str = "", **fields: Any) -> dict:
        entry = {"ts_ms": int(time.time() * 1000), "rollout": self.rid, "by": self.by, "action": action,
                 "package_sha256": self.package_sha256, "device": device, "result": result, "why": why, **fields}
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    def read(self) -> list[dict]:
        return read_log(self.path)

    def lock(self) -> bool:
        """Hold ``{id}.lock`` while this process works on the rollout (released by the kernel when
        the process dies); False when another process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        f = open(self.dir / f"{self.rid}.lock", "a+")  # noqa: SIM115 - held for the process' life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._lockfile = f
        return True

    def unlock(self) -> None:
        if self._lockfile is not None:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
            self._lockfile.close()
            self._lockfile = None


def read_log(path: Path) -> list[dict]:
    """Every complete line (a line torn by a crash mid-write is ignored)."""
    if not path.is_file():
        raise UserInputError(f"no rollout log {path}")
    out = []
    for line in path.read_bytes().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict):
            out.append(e)
    return out


def list_logs(state_dir: str | Path) -> list[Path]:
    d = Path(state_dir).expanduser()
    return sorted(d.glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if d.is_dir() else []


@dataclasses.dataclass
class DeviceState:
    from_model: Optional[str] = None  # the active model (fleet.model_key) when the rollout planned this device
    phase: str = "pending"  # pending, deployed, then one of FINAL
    updated: bool = False  # this rollout changed the active model (and has not rolled it back)
    failed: bool = False  # counts against max_failures
    why: str = ""
    p95_ms: Optional[float] = None
    profile_p95_ms: Optional[float] = None  # from the deploy answer (the gate of a device without streams)


def device_states(entries: Iterable[dict], package_sha: str) -> dict[str, DeviceState]:
    """Replay the log into one state per planned device."""
    states: dict[str, DeviceState] = {}
    for e in entries:
        dev = e.get("device")
        if e.get("action") == "start":
            for name, sha in (e.get("devices") or {}).items():
                states[name] = DeviceState(from_model=sha)
            for name in e.get("offline") or []:
                states[name] = DeviceState(phase="skipped", why="offline when the rollout started")
            continue
        if dev is not None and dev in states:
            apply_entry(states[dev], e, package_sha)
    return states


def apply_entry(s: DeviceState, e: dict, package_sha: str) -> None:
    """One device line of the log applied to that device's state (replay and live use this)."""
    a, res = e.get("action"), e.get("result")
    if a == "rollback":  # keep why it failed, add how the rollback went
        s.why = (f"{s.why}; " if s.why else "") + f"rollback: {e.get('why', '')}"
    else:
        s.why = e.get("why") or s.why
    if a == "skip":
        s.phase = "skipped"
    elif a == "deploy" and res == "ok":
        s.phase, s.updated = "deployed", s.from_model != package_sha
        s.profile_p95_ms = e.get("profile_p95_ms")
    elif a == "deploy":
        s.phase, s.failed = "failed", True
        s.updated = bool(e.get("updated"))  # no answer, yet the status shows the new model
    elif a == "gate":
        s.p95_ms = e.get("p95_ms")
        s.phase, s.failed = ("passed", False) if res == "pass" else ("failed", True)
    elif a == "rollback":
        s.phase = "rolled_back" if res == "ok" else "rollback_failed"
        s.updated = res != "ok"


def counts(states: dict[str, DeviceState]) -> dict[str, int]:
    out = {k: 0 for k in ("pending", "deployed", *FINAL)}
    for s in states.values():
        out[s.phase] = out.get(s.phase, 0) + 1
    out["failures"] = sum(1 for s in states.values() if s.failed)
    return out


def rollout_phase(entries: list[dict]) -> str:
    """running (no finish line), or the finish line's state (done, aborted)."""
    for e in reversed(entries):
        if e.get("action") == "finish":
            return str(e.get("state", "done"))
    return "running"
