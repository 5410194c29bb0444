"""The package a command brings, as a local file: inline base64, a device path, or a URL.

Rules (issue #18): a path (or ``file://`` URL) must be a plain absolute or relative path without
NUL and outside ``/proc``, ``/sys`` and ``/dev``; an ``http(s)://`` URL only to a host listed in
``agent.fetch_allowed_hosts`` (none by default), never redirected to another host, with one overall
deadline (``agent.fetch_timeout_s``) and the size cap ``agent.max_package_mb``. Whatever fails,
the staging folder is removed before the error is answered.

Imports agent.commands (CommandError), agent.settings and agent.fsutil.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

from prune_pack.agent.commands import MAX_PATH, CommandError
from prune_pack.agent.fsutil import disk_full
from prune_pack.agent.settings import AgentSection

MiB = 1024 * 1024
FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")
_CHUNK = 1 << 20


def check_path(raw: str) -> Path:
    """A device path from a request, or ``bad_request`` (NUL, over-long, a kernel pseudo-filesystem)."""
    if not raw or "\x00" in raw or len(raw) > MAX_PATH:
        raise CommandError("bad_request", "path must be 1-4096 characters without NUL")
    p = Path(os.path.abspath(raw))
    try:
        real = Path(os.path.realpath(p))
    except (OSError, ValueError):
        raise CommandError("bad_request", f"path {raw[:200]!r} cannot be resolved") from None
    for root in FORBIDDEN_ROOTS:
        if any(str(x) == root or str(x).startswith(root + "/") for x in (p, real)):
            raise CommandError("bad_request", f"path under {root} is not a package")
    return p


def host_allowed(url: str, allowed: list[str]) -> bool:
    """``host`` or ``host:port`` entries; a bare host allows any port."""
    u = urllib.parse.urlsplit(url)
    host = (u.hostname or "").lower()
    try:
        port = u.port
    except ValueError:
        return False
    for a in allowed:
        a = a.lower().strip()
        if a == host or (port is not None and a == f"{host}:{port}"):
            return True
    return False


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme, host and port (an open redirect must not
    turn the device into a scanner of its own network)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
            raise CommandError("fetch_failed", f"redirect to another host refused ({new.scheme}://{new.hostname})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: Path, limit: int, deadline_s: float) -> int:
    """Stream ``url`` to ``dest``: at most ``limit`` bytes within ``deadline_s`` seconds in all."""
    end = time.monotonic() + deadline_s
    opener = urllib.request.build_opener(_SameHostRedirects())
    n = 0
    with opener.open(url, timeout=min(30.0, deadline_s)) as r, open(dest, "wb") as f:  # noqa: S310 - scheme checked
        length = r.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise CommandError("too_large", f"download of {length} bytes over the limit of {limit}")
        sock = getattr(getattr(getattr(r, "fp", None), "raw", None), "_sock", None)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise CommandError("fetch_timeout", f"download not complete within {deadline_s:g} s")
            if sock is not None:
                sock.settimeout(max(0.05, min(30.0, left)))
            try:
                chunk = r.read1(_CHUNK)  # one receive at a time, so a trickling server meets the deadline
            except (socket.timeout, TimeoutError):
                raise CommandError("fetch_timeout", f"download not complete within {deadline_s:g} s") from None
            if not chunk:
                return n
            n += len(chunk)
            if n > limit:
                raise CommandError("too_large", f"download over the limit of {limit} bytes")
            f.write(chunk)


def _b64_to_file(text: str, dest: Path, chunk: int = 4 * 256 * 1024) -> None:
    """Decode base64 in 1 MiB slices straight to ``dest``: one decoded copy of a slice in memory,
    never a second copy of the whole package."""
    if len(text) % 4:
        raise CommandError("bad_request", "package_b64 is not valid base64")
    with open(dest, "wb") as f:
        for i in range(0, len(text), chunk):
            try:
                f.write(base64.b64decode(text[i:i + chunk], validate=True))
            except (binascii.Error, ValueError):
                raise CommandError("bad_request", "package_b64 is not valid base64") from None


class Fetched:
    """Context manager: the package of a command as a local file; every temporary file is removed
    on exit and on any failure inside ``__enter__`` (where ``__exit__`` would not run)."""

    def __init__(self, agent: AgentSection, new_staging: Callable[[str], Path], args: dict) -> None:
        self.agent, self.new_staging, self.args = agent, new_staging, args
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        try:
            return self._get()
        except BaseException as e:
            self._cleanup()
            if disk_full(e):
                raise CommandError("disk_full", f"no space left for the package: {e}") from None
            raise

    def __exit__(self, *exc: Any) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _get(self) -> Path:
        a, agent = self.args, self.agent
        if "package_b64" in a:
            limit = int(agent.max_inline_mb * MiB)
            if len(a["package_b64"]) > limit * 4 // 3 + 4:
                raise CommandError("too_large", f"inline package over max_inline_mb={agent.max_inline_mb}; send a path or URL")
            self.tmp = self.new_staging("incoming")
            p = self.tmp / "package.ppk"
            _b64_to_file(a["package_b64"], p)
            return p
        if "path" in a:
            return check_path(a["path"])
        url = a["url"]
        u = urllib.parse.urlsplit(url)
        if u.scheme == "file":
            if u.netloc not in ("", "localhost"):
                raise CommandError("bad_request", "a file:// URL names a local path (file:///...)")
            return check_path(urllib.parse.unquote(u.path))
        if u.scheme not in ("http", "https"):
            raise CommandError("bad_request", f"url scheme must be file, http or https, got {u.scheme!r}")
        if not host_allowed(url, list(agent.fetch_allowed_hosts)):
            raise CommandError("host_not_allowed", f"{u.hostname!r} is not in agent.fetch_allowed_hosts")
        self.tmp = self.new_staging("incoming")
        p = self.tmp / "package.ppk"
        try:
            download(url, p, int(agent.max_package_mb * MiB), agent.fetch_timeout_s)
        except (urllib.error.URLError, socket.timeout, ConnectionError, ValueError) as e:
            raise CommandError("fetch_failed", f"{url}: {e}") from None
        except OSError as e:
            if disk_full(e):
                raise
            raise CommandError("fetch_failed", f"{url}: {e}") from None
        return p
