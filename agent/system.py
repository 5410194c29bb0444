"""The daemon's contact with the operating system: systemd's notify protocol and watchdog,
fault injection for the crash tests, the machine id and temperature sensors.

Imports only the standard library (psutil lazily).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path
from typing import Optional

log = logging.getLogger("prune_pack.agent.daemon")

# Fault injection for the crash tests: SIGKILL ourselves at a named point of a deploy.
CRASH_ENV = "PRUNE_PACK_CRASH_AT"
CRASH_POINTS = ("verified", "stage_files", "staged", "before_switch", "after_switch")


def sd_notify(message: str) -> bool:
    """systemd's notify protocol without libsystemd: one datagram to $NOTIFY_SOCKET
    (a path, or '@name' in the abstract namespace). False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", message.split("\n")[0], e)
        return False


def watchdog_interval_s() -> Optional[float]:
    """Half of systemd's watchdog timeout, if one is set for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.error("fault injection: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


def machine_id() -> Optional[str]:
    """systemd's /etc/machine-id (what a manifest's ``machine_ids`` binds to), if readable."""
    try:
        return Path("/etc/machine-id").read_text().strip()[:32] or None
    except OSError:
        return None


def temperature_c() -> Optional[float]:
    try:
        import psutil

        temps = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        vals = [t.current for entries in temps.values() for t in entries if t.current is not None]
        if vals:
            return round(max(vals), 1)
    except Exception:  # noqa: BLE001 - sensors are optional and vary wildly
        pass
    return None
