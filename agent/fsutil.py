"""Crash-safe file primitives: the one place that decides how files appear on disk.

Used by the package writer and verifier, the key files, the model store and the outbox. One
error policy for directory fsync: a filesystem that cannot fsync a directory (``EINVAL``,
``ENOTSUP``) is accepted; a real I/O error (``EIO``, ``ENOSPC``, ...) is raised, because the
rename before it may not be durable. ``disk_full`` tells a full disk from other errors, so
callers answer the stable reason ``disk_full`` instead of ``internal``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator, Optional

# Filesystems (some FUSE, some network mounts) that refuse fsync on a directory.
_DIR_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename/creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` complete or not at all (temp + fsync + rename +
    directory fsync). The temp file is ``.{name}.XXXX.tmp`` beside it; it is removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: other readers and a crash see the old or the new bytes."""
    with atomic_file(path, mode) as f:
        f.write(data)


def write_new(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (never following or replacing an existing entry) with ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def disk_full(e: BaseException) -> bool:
    """True for the errors a full disk (or quota, or file-size limit) raises, sqlite's included."""
    if isinstance(e, OSError):
        return e.errno in _DISK_FULL
    text = str(e).lower()
    return type(e).__name__ in ("OperationalError", "DatabaseError") and ("full" in text or "disk i/o" in text)


def move_aside(path: str | os.PathLike, tag: str = "corrupt") -> Optional[Path]:
    """Rename a damaged file or folder to ``{name}.{tag}-{time}`` (kept for a post-mortem); None if absent."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return None
    dest = p.with_name(f"{p.name}.{tag}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(p, dest)
    with contextlib.suppress(OSError):
        fsync_dir(p.parent)
    return dest


def free_bytes(path: str | os.PathLike) -> Optional[int]:
    """Bytes available to this process on ``path``'s filesystem, or None when it cannot be read."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
