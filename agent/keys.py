"""Keys: Ed25519 key generation and loading, key ids, trust and revocation (which trusted key
signed these bytes, and is it revoked), and the host's per-model version counter (a locked
registry). Package signing and command signing (agent.cmdauth) use the same key functions.

Imports only the standard library, ``cryptography``, agent.fsutil and ``prune_pack.errors``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from prune_pack.agent.fsutil import atomic_write
from prune_pack.errors import PackageRejected, UserInputError

KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
KeyLike = Union[str, os.PathLike, Ed25519PublicKey]
PrivateKeyLike = Union[str, os.PathLike, Ed25519PrivateKey]


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "prune-pack"


def default_key_path() -> Path:
    """The user's signing key: ``$XDG_CONFIG_HOME/prune-pack/signing.key`` (or ``~/.config/...``)."""
    return config_dir() / "signing.key"


def default_pub_path() -> Path:
    """The public half of the user's signing key (what a host trusts for its own packages)."""
    return config_dir() / "signing.pub"


def host_trusted_keys(configured: Iterable[KeyLike] = (), passed: Iterable[KeyLike] = ()) -> list[KeyLike]:
    """What ``prune-pack profile``/``verify`` trust on a host: the configured keys, the keys passed
    with ``--pubkey``, and the user's own signing key (``default_pub_path()``) when it exists, so a
    package this user built verifies without flags. The agent daemon never calls this."""
    keys: list[KeyLike] = [*configured, *passed]
    own = default_pub_path()
    if own.is_file():
        keys.append(own)
    return keys


def unsigned_on_host(e: PackageRejected, what: str) -> PackageRejected:
    """The host's one-line answer to an unsigned package: name the flag that accepts it."""
    if e.reason != "unsigned":
        return e
    return PackageRejected("unsigned", f"the package has no signature; pass --allow-unsigned to {what} it on this host "
                                       "(a device never runs an unsigned package)")


def _write_no_clobber(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` from creation on (never briefly wider).

    A temp file is created with ``os.open(..., mode)`` and fsynced; without ``force`` it is
    hard-linked into place (fails if ``path`` exists, so two racing ``keys init`` cannot
    overwrite each other), with ``force`` renamed over it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)  # mkstemp already made it 0600; this sets the public key's 0644
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise UserInputError(f"{path} exists; pass --force to overwrite it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def generate_keypair(out_dir: Union[str, os.PathLike], force: bool = False) -> tuple[Path, Path]:
    """Create ``out_dir/signing.key`` (PKCS#8 PEM, mode 0600) and ``out_dir/signing.pub`` (PEM).

    Refuses to overwrite an existing key unless ``force``: a lost signing key means every device
    has to be given a new trusted key.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv_path, pub_path = out / "signing.key", out / "signing.pub"
    if not force:
        for p in (priv_path, pub_path):
            if p.exists() or p.is_symlink():
                raise UserInputError(f"{p} exists; pass --force to overwrite it")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_no_clobber(priv_path, priv_pem, 0o600, force)
    _write_no_clobber(pub_path, pub_pem, 0o644, force)
    return priv_path, pub_path


def ensure_default_key() -> tuple[Path, bool]:
    """The user's default signing key, created on first use: ``(path, created)``."""
    path = default_key_path()
    if path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        generate_keypair(path.parent)
    except UserInputError:
        if path.exists():  # another process created it concurrently: use that one
            return path, False
        raise
    return path, True


def _read_key_file(path: Union[str, os.PathLike], what: str) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > 64 * 1024:
            raise UserInputError(f"{what} {p} is not a key file (too large)")
        return p.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise UserInputError(f"{what} {p} is a directory") from None
    except PermissionError:
        raise UserInputError(f"{what} {p} is not readable (permission denied)") from None


def load_private_key(path: PrivateKeyLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8) file, or the key itself."""
    if isinstance(path, Ed25519PrivateKey):
        return path
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UserInputError(f"signing key {path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserInputError(f"signing key {path} is not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: KeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (raw 32 bytes, base64 or not, also accepted)."""
    if isinstance(path, Ed25519PublicKey):
        return path
    data = _read_key_file(path, "public key")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            raw = data if len(data) == 32 else base64.b64decode(data.strip(), validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError, binascii.Error) as e:
        raise UserInputError(f"public key {path} is not a PEM (or raw) public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserInputError(f"public key {path} is not an Ed25519 key ({type(key).__name__})")
    return key


def key_id(pubkey: Union[KeyLike, Ed25519PrivateKey]) -> str:
    """Short fingerprint (16 hex chars of sha256 over the raw 32 public bytes)."""
    if isinstance(pubkey, Ed25519PrivateKey):
        pubkey = pubkey.public_key()
    key = load_public_key(pubkey)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _parse_signature(data: bytes) -> bytes:
    if len(data) == 64:
        return data
    try:
        sig = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise PackageRejected("bad_signature", "signature is neither 64 raw bytes nor base64") from None
    if len(sig) != 64:
        raise PackageRejected("bad_signature", f"an Ed25519 signature has 64 bytes, got {len(sig)}")
    return sig


def revoked_key_ids(revoked: Iterable[Union[KeyLike, str]]) -> set[str]:
    """Revoked keys: public key files, key objects, or bare key ids (16 hex digits)."""
    ids = set()
    for r in revoked:
        if isinstance(r, str) and KEY_ID_RE.match(r) and not os.path.exists(r):
            ids.add(r)
        else:
            ids.add(key_id(r))
    return ids


def _verifies(key: Ed25519PublicKey, sig: bytes, data: bytes) -> bool:
    try:
        key.verify(sig, data)
        return True
    except InvalidSignature:
        return False


def check_signature(
    manifest: dict, manifest_bytes: bytes, sig_bytes: bytes, trusted: Sequence[KeyLike], revoked: Iterable[Union[KeyLike, str]]
) -> str:
    """The id of the trusted key whose signature this is, or PackageRejected."""
    sig = _parse_signature(sig_bytes)
    revoked_ids = revoked_key_ids(revoked)
    keys = [(key_id(k), load_public_key(k)) for k in trusted]
    signer = manifest.get("signer")
    if signer in revoked_ids:
        raise PackageRejected("revoked_key", f"signer {signer} is revoked")
    for kid, key in keys:
        if _verifies(key, sig, manifest_bytes):
            # The revoked list wins even when the same key is still listed as trusted.
            if kid in revoked_ids:
                raise PackageRejected("revoked_key", f"signer {kid} is revoked")
            return kid
    if not keys:
        raise PackageRejected("untrusted_key", "no trusted keys configured (--pubkey FILE or agent.trusted_keys)")
    trusted_ids = {kid for kid, _ in keys}
    if isinstance(signer, str) and signer not in trusted_ids:
        raise PackageRejected("untrusted_key", f"signed by {signer}, trusted: {', '.join(sorted(trusted_ids))}")
    raise PackageRejected("bad_signature", "the signature does not match the manifest")


def _versions_path(registry: Union[str, os.PathLike, None]) -> Path:
    return Path(registry) if registry is not None else config_dir() / "versions.json"


@contextlib.contextmanager
def _locked_registry(registry: Union[str, os.PathLike, None]) -> Iterator[tuple[Path, dict[str, int]]]:
    import fcntl  # Unix only, like the agent

    path = _versions_path(registry)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            data: dict[str, int] = {}
            if path.exists():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
                        raise ValueError("expected an object of integers")
                except (ValueError, UnicodeDecodeError) as e:
                    # Never silently restart at 1: devices would refuse (or worse, accept
                    # replays of) the new packages.
                    raise UserInputError(f"version registry {path} is corrupt ({e}); fix or remove it") from None
            yield path, data
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def next_version(name: str, registry: Union[str, os.PathLike, None] = None) -> int:
    """The next manifest version for model ``name`` on this host (1, 2, 3, ...; never repeats).

    The counter lives in ``$XDG_CONFIG_HOME/prune-pack/versions.json`` (or ``registry``),
    updated under an exclusive ``fcntl`` lock with an atomic write.
    """
    with _locked_registry(registry) as (path, data):
        v = int(data.get(name, 0)) + 1
        data[name] = v
        atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return v


def record_version(name: str, version: int, registry: Union[str, os.PathLike, None] = None) -> None:
    """Raise ``name``'s counter to at least ``version`` (an explicit ``--version-number``), so that
    the next automatic version is newer than it."""
    with _locked_registry(registry) as (path, data):
        if version > int(data.get(name, 0)):
            data[name] = int(version)
            atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def cli_keys_init(args: Any, cfg: Any) -> dict:
    """``prune-pack keys init --out DIR [--force]``: a new Ed25519 key pair."""
    priv, pub = generate_keypair(args.out, force=bool(getattr(args, "force", False)))
    kid = key_id(pub)
    return {
        "ok": True,
        "private_key": str(priv),
        "public_key": str(pub),
        "key_id": kid,
        "summary": f"wrote {priv} (keep it secret) and {pub} (copy to devices' agent.trusted_keys); key id {kid}",
    }
