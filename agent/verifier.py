"""The package verifier: ``verify_package`` is the gate every package passes before anything
else touches it. It checks the archive's structure and declared sizes from the central directory
*before* extracting, verifies the signature against the trusted keys (a revoked-keys list wins),
then streams the members into a fresh staging folder while enforcing the limits again (declared
sizes can lie) and hashing. A rejection raises ``PackageRejected(reason, detail)`` with one of
``agent.manifest.REASONS`` and leaves nothing behind.

Imports agent.manifest, agent.keys, agent.fsutil and ``prune_pack.errors``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from prune_pack.agent.fsutil import fsync_dir, write_new
from prune_pack.agent.keys import KeyLike, check_signature, host_trusted_keys, unsigned_on_host
from prune_pack.agent.manifest import (
    _CHUNK,
    BOMB_MIN_BYTES,
    DEFAULT_MAX_BYTES,
    MANIFEST,
    MANIFEST_SCHEMA,
    MAX_COMPRESSION_RATIO,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    MEMBERS,
    MODEL,
    REQUIRED_MEMBERS,
    SIGNATURE,
    MiB,
    manifest_problem,
    parse_manifest,
    read_limited,
)
from prune_pack.errors import PackageRejected


@dataclass
class VerifiedPackage:
    """A package that passed ``verify_package``, extracted into its own staging folder."""

    dir: Path  # the fresh staging folder (owned by the caller: move it into the store or discard())
    manifest: dict
    model_path: Path
    key_id: Optional[str]  # the trusted key that signed it; None when unsigned (allow_unsigned)
    signed: bool

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def discard(self) -> None:
        """Remove the staging folder (when the package is not kept)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def _check_member_name(info: zipfile.ZipInfo) -> None:
    # orig_filename: zipfile truncates a name at NUL, which could hide "model.onnx\0../x".
    raw = info.orig_filename
    bad = (
        not raw
        or "\x00" in raw
        or "\\" in raw
        or raw.startswith("/")
        or re.match(r"^[A-Za-z]:", raw) is not None
        or any(part in ("", ".", "..") for part in raw.rstrip("/").split("/"))
        or any(ord(c) < 32 for c in raw)
    )
    if bad:
        raise PackageRejected("bad_member_name", repr(raw))


def _check_structure(zf: zipfile.ZipFile, max_bytes: int) -> dict[str, zipfile.ZipInfo]:
    """Everything the central directory can tell before a byte is extracted."""
    infos = zf.infolist()
    if len(infos) > 16:  # three are expected; thousands would only cost time
        raise PackageRejected("unexpected_member", f"{len(infos)} members")
    seen: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        _check_member_name(info)
        # Unix mode in the high 16 bits; a file type of 0 (Python's writestr, Windows zips) is a file.
        ftype = stat.S_IFMT(info.external_attr >> 16)
        if ftype == stat.S_IFLNK:
            raise PackageRejected("link_member", f"{info.filename} is a symbolic link")
        if ftype not in (0, stat.S_IFREG) or info.is_dir():
            raise PackageRejected("unexpected_member", f"{info.filename} is not a regular file")
        if info.filename in seen:
            raise PackageRejected("duplicate_member", info.filename)
        seen[info.filename] = info
        if info.filename not in MEMBERS:
            raise PackageRejected("unexpected_member", info.filename)
        if info.flag_bits & 0x1:
            raise PackageRejected("unsupported_member", f"{info.filename} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise PackageRejected("unsupported_member", f"{info.filename} uses compression method {info.compress_type}")
        limit = {MANIFEST: MAX_MANIFEST_BYTES, SIGNATURE: MAX_SIGNATURE_BYTES}.get(info.filename, max_bytes)
        if info.file_size > limit:
            raise PackageRejected("member_too_large", f"{info.filename}: {info.file_size} bytes > {limit}")
        if info.file_size >= BOMB_MIN_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            raise PackageRejected("zip_bomb", f"{info.filename}: {info.file_size} bytes from {info.compress_size}")
        total += info.file_size
    if total > max_bytes:
        raise PackageRejected("too_large", f"members total {total} bytes > {max_bytes}")
    for name in REQUIRED_MEMBERS:
        if name not in seen:
            raise PackageRejected("missing_member", name)
    return seen


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, limit: int, hasher: Any = None) -> int:
    """Stream one member to ``dest`` (a new file), never writing more than ``limit`` bytes."""
    n = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            n += len(chunk)
            if n > limit:  # declared sizes can lie; what is written may not
                raise PackageRejected("member_too_large", f"{info.filename}: more than {limit} bytes")
            if hasher is not None:
                hasher.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return n


def _extract_model(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, manifest: dict) -> None:
    """Stream model.onnx to ``dest`` and check it against the (authentic) manifest's size and sha256."""
    h = hashlib.sha256()
    try:
        n = _extract(zf, info, dest, manifest["size"], h)
    except zipfile.BadZipFile as e:
        if "CRC" in str(e):  # the stored bytes were altered after packing
            raise PackageRejected("hash_mismatch", f"model.onnx: {e}") from None
        raise
    if n != manifest["size"]:
        raise PackageRejected("size_mismatch", f"model.onnx streamed {n} bytes, the manifest says {manifest['size']}")
    if h.hexdigest() != manifest["sha256"]:
        raise PackageRejected("hash_mismatch", f"model.onnx sha256 {h.hexdigest()[:12]}…, the manifest says {manifest['sha256'][:12]}…")


def verify_package(
    path: Union[str, os.PathLike],
    trusted_keys: Sequence[KeyLike] = (),
    revoked_keys: Iterable[Union[KeyLike, str]] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_unsigned: bool = False,
    staging_root: Union[str, os.PathLike, None] = None,
) -> VerifiedPackage:
    """Verify a package and extract it into a fresh staging folder, or raise ``PackageRejected``.

    Order: file size -> zip structure and declared sizes (central directory) -> manifest JSON
    and schema -> signature (revoked keys win over trusted ones) -> declared model size ->
    streamed extraction with hash and size checks. ``trusted_keys`` are public key files (PEM)
    or key objects; ``revoked_keys`` may also be bare key ids. Misconfigured key files raise
    ``UserInputError``. On any failure the staging folder is removed.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise PackageRejected("not_a_package", f"{p}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PackageRejected("not_a_package", f"{p} is not a regular file")
    if st.st_size > max_bytes:
        raise PackageRejected("too_large", f"{st.st_size} bytes > {max_bytes}")

    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise PackageRejected("not_a_package", f"{p}: {e}") from None
    stage: Optional[Path] = None
    try:
        with zf:
            infos = _check_structure(zf, max_bytes)
            with zf.open(infos[MANIFEST]) as src:
                manifest_bytes = read_limited(src, MAX_MANIFEST_BYTES, MANIFEST)
            manifest = parse_manifest(manifest_bytes)
            schema = manifest.get("schema")
            if schema != MANIFEST_SCHEMA or isinstance(schema, bool):
                raise PackageRejected("unknown_schema", f"schema {schema!r}; this agent reads schema {MANIFEST_SCHEMA}")
            problem = manifest_problem(manifest)
            if problem:
                raise PackageRejected("bad_manifest", problem)

            kid: Optional[str] = None
            if SIGNATURE in infos:
                with zf.open(infos[SIGNATURE]) as src:
                    sig_bytes = read_limited(src, MAX_SIGNATURE_BYTES, SIGNATURE)
                # A signature that is present is always checked, even when unsigned is allowed.
                kid = check_signature(manifest, manifest_bytes, sig_bytes, trusted_keys, revoked_keys)
            elif not allow_unsigned:
                raise PackageRejected("unsigned", "the package has no signature")

            # From here on the manifest is authentic (or explicitly allowed unsigned).
            model_info = infos[MODEL]
            if model_info.file_size != manifest["size"]:
                raise PackageRejected("size_mismatch", f"model.onnx is {model_info.file_size} bytes, the manifest says {manifest['size']}")

            if staging_root is not None:
                Path(staging_root).mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix="ppk-", dir=staging_root))
            _extract_model(zf, model_info, stage / MODEL, manifest)
            # The verified bytes themselves, not a second read of the archive.
            write_new(stage / MANIFEST, manifest_bytes)
            if SIGNATURE in infos:
                write_new(stage / SIGNATURE, sig_bytes)
            fsync_dir(stage)
        return VerifiedPackage(dir=stage, manifest=manifest, model_path=stage / MODEL, key_id=kid, signed=kid is not None)
    except BaseException as e:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        # Corrupt local headers or deflate streams surface only while reading.
        if isinstance(e, (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error)):
            raise PackageRejected("not_a_package", f"{p}: {e}") from None
        raise


def cli_verify(args: Any, cfg: Any) -> dict:
    """``prune-pack verify PACKAGE [--pubkey FILE ...] [--allow-unsigned]``: exit 0 only when valid."""
    agent = getattr(cfg, "agent", None)
    passed = list(getattr(args, "pubkey", None) or [])
    trusted = host_trusted_keys([] if passed else (agent.trusted_keys if agent else []), passed)
    revoked = list(agent.revoked_keys) if agent else []
    max_bytes = int((agent.max_package_mb if agent else DEFAULT_MAX_BYTES / MiB) * MiB)
    allow_unsigned = bool(getattr(args, "allow_unsigned", False) or (agent.allow_unsigned if agent else False))
    try:
        pkg = verify_package(args.package, trusted, revoked, max_bytes=max_bytes, allow_unsigned=allow_unsigned)
    except PackageRejected as e:
        raise unsigned_on_host(e, "verify") from None
    pkg.discard()  # verification only: nothing is kept
    m = pkg.manifest
    signed = f"signed by {pkg.key_id}" if pkg.signed else "UNSIGNED"
    return {
        "ok": True,
        "name": m["name"],
        "version": m["version"],
        "precision": m["precision"],
        "sha256": m["sha256"],
        "size": m["size"],
        "key_id": pkg.key_id,
        "signed": pkg.signed,
        "summary": f"{args.package}: OK: {m['name']} v{m['version']} {m['precision']} sha256 {m['sha256'][:12]} ({signed})",
    }


def signature_verifies(model_dir: Union[str, os.PathLike], trusted_keys: Sequence[KeyLike] = (),
                       revoked_keys: Iterable[Union[KeyLike, str]] = ()) -> bool:
    """A stored model's ``manifest.json`` carries a valid signature of a trusted, unrevoked key
    (the store's hashes tie ``model.onnx`` to that manifest). The daemon checks it at start-up,
    so a local swap of model and re-hashed manifest is not served."""
    d = Path(model_dir)
    try:
        manifest_bytes = (d / MANIFEST).read_bytes()
        sig = (d / SIGNATURE).read_bytes()
        if len(manifest_bytes) > MAX_MANIFEST_BYTES or len(sig) > MAX_SIGNATURE_BYTES:
            return False
        check_signature(parse_manifest(manifest_bytes), manifest_bytes, sig, trusted_keys, revoked_keys)
        return True
    except (OSError, PackageRejected):
        return False
