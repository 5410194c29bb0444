"""A local Mosquitto for the bench scripts (127.0.0.1 only; never the system service)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(tmp: Path, users: Optional[dict[str, str]] = None, acl: str = "", extra: str = ""
                 ) -> tuple[subprocess.Popen, int]:
    """Start Mosquitto on a free port: anonymous without ``users``, else a password file and ``acl``.
    ``extra``: more mosquitto.conf lines. Returns (process, port) once it accepts connections."""
    port = free_port()
    conf = f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\npersistence false\n"
    if users:
        pw = tmp / "passwd"
        pw.write_text("")
        for user, secret in users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(pw), user, secret], check=True, capture_output=True)
        (tmp / "acl").write_text(acl)
        conf += f"allow_anonymous false\npassword_file {pw}\nacl_file {tmp / 'acl'}\n"
    else:
        conf += "allow_anonymous true\n"
    (tmp / "mosquitto.conf").write_text(conf + extra)
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")
