"""Deployment packages (``.ppk``): pack, sign, verify. Device side: stdlib + ``cryptography`` only.

A package is a zip archive with exactly three members:

- ``manifest.json``: what the model is (see ``write_package`` for the fields); it pins
  ``model.onnx`` by ``sha256`` and ``size``.
- ``model.onnx``: the model, stored uncompressed.
- ``signature``: a detached Ed25519 signature over the *exact* ``manifest.json`` bytes
  (base64 text; raw 64 bytes are accepted too). Because the manifest pins the model's hash,
  one signature covers both.

``verify_package`` is the gate every package passes before anything else touches it: it checks
the archive's structure and declared sizes from the central directory *before* extracting,
verifies the signature against the device's trusted keys (a revoked-keys list wins), then
streams the members into a fresh staging folder while enforcing the limits again (declared
sizes can lie) and hashing. A rejection raises ``PackageRejected(reason, detail)`` with one of
``REASONS`` and leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Optional, Sequence, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from prune_pack import __version__
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
    "older_version",  # check_newer: not newer than the active package of the same name (replay)
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_PRECISION_RE = re.compile(r"^[a-z0-9]{1,16}$")

KeyLike = Union[str, os.PathLike, Ed25519PublicKey]
PrivateKeyLike = Union[str, os.PathLike, Ed25519PrivateKey]


# ------------------------------------------------------------------ keys


def _config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "prune-pack"


def default_key_path() -> Path:
    """The user's signing key: ``$XDG_CONFIG_HOME/prune-pack/signing.key`` (or ``~/.config/...``)."""
    return _config_dir() / "signing.key"


def _pub_path_for(priv: Path) -> Path:
    return priv.with_suffix(".pub")


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


# ------------------------------------------------------------------ version counter


def _versions_path(registry: Union[str, os.PathLike, None]) -> Path:
    return Path(registry) if registry is not None else _config_dir() / "versions.json"


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


@contextlib.contextmanager
def _atomic_file(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` complete or not at all (temp + fsync + rename)."""
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
    _fsync_dir(path.parent)


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    with _atomic_file(path, mode) as f:
        f.write(data)


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows fsync on a directory
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def next_version(name: str, registry: Union[str, os.PathLike, None] = None) -> int:
    """The next manifest version for model ``name`` on this host (1, 2, 3, ...; never repeats).

    The counter lives in ``$XDG_CONFIG_HOME/prune-pack/versions.json`` (or ``registry``),
    updated under an exclusive ``fcntl`` lock with an atomic write.
    """
    with _locked_registry(registry) as (path, data):
        v = int(data.get(name, 0)) + 1
        data[name] = v
        _atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return v


def record_version(name: str, version: int, registry: Union[str, os.PathLike, None] = None) -> None:
    """Raise ``name``'s counter to at least ``version`` (an explicit ``--version-number``), so that
    the next automatic version is newer than it."""
    with _locked_registry(registry) as (path, data):
        if version > int(data.get(name, 0)):
            data[name] = int(version)
            _atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# ------------------------------------------------------------------ manifest


def _jsonable(v: Any) -> Any:
    """Manifest values as plain JSON: numpy scalars/arrays, tuples, Paths; NaN/inf -> null."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, (str, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if hasattr(v, "tolist"):  # numpy scalar or array, without importing numpy here
        return _jsonable(v.tolist())
    raise UserInputError(f"manifest value {v!r} ({type(v).__name__}) is not JSON-serialisable")


def _manifest_problem(m: Any) -> Optional[str]:
    """Why ``m`` is not a valid schema-1 manifest, or None (the checks both sides share)."""
    if not isinstance(m, dict):
        return "not a JSON object"

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    name = m.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return f"name must be 1-128 of letters, digits, '.', '_', '+', '-', got {name!r}"
    if not is_int(m.get("version")) or m["version"] < 1:
        return f"version must be an integer >= 1, got {m.get('version')!r}"
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
    return None


def _onnx_input(path: Path) -> Optional[dict]:
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


def write_package(
    onnx_path: Union[str, os.PathLike],
    manifest: dict,
    out_path: Union[str, os.PathLike],
    signing_key: Optional[PrivateKeyLike] = None,
    registry: Union[str, os.PathLike, None] = None,
) -> Path:
    """Pack ``onnx_path`` with ``manifest`` (and a signature with ``signing_key``) into ``out_path``.

    The caller's manifest carries what only the host knows; these fields are expected
    (``name`` and ``precision`` required, the rest recommended)::

        name: str                   model name; the version counter and replay protection key on it
        version: int                increases per name (default: next_version(name, registry))
        precision: "fp32" | "int8" | ...
        input: {name, shape, dtype} (default: read from the ONNX with ONNX Runtime)
        names: [str, ...]           class names by id
        validated: [{backend, precision}, ...]   combinations checked on the host (check_validated)
        provenance: {base_sha256, criterion, ratio | widths, ...}
        metrics: {map50_95, map50, params, gflops, host_latency: {ms, threads, imgsz, ...}}

    Filled in here: ``schema``, ``sha256``, ``size``, ``created`` and ``prune_pack_version``
    (unless given) and ``signer`` (the key id, when signed; so a device can tell
    "untrusted key" from "bad signature"). Written atomically: temp file, fsync, rename.
    """
    onnx_path, out = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise UserInputError(f"model not found: {onnx_path}")
    m = _jsonable(dict(manifest))
    m.pop("signer", None)
    if "name" not in m:
        raise UserInputError("manifest needs a 'name'")
    if "precision" not in m:
        raise UserInputError("manifest needs a 'precision' (fp32, int8, ...)")
    m["schema"] = MANIFEST_SCHEMA
    m.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"))
    m.setdefault("prune_pack_version", __version__)
    if m.get("input") is None:
        inp = _onnx_input(onnx_path)
        if inp is not None:
            m["input"] = inp
    key = load_private_key(signing_key) if signing_key is not None else None
    if key is not None:
        m["signer"] = key_id(key)
    # Fail before copying (and before using up a version number) on what is already known.
    problem = _manifest_problem({"version": 1, **m, "sha256": "0" * 64, "size": 0})
    if problem:
        raise UserInputError(f"invalid manifest: {problem}")
    if "version" not in m and isinstance(m.get("name"), str) and _NAME_RE.match(m["name"]):
        m["version"] = next_version(m["name"], registry)

    out.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(out) as f:
        with zipfile.ZipFile(f, "w", allowZip64=True) as zf:
            # The model goes first and is hashed in the same pass that copies it, so the
            # manifest describes exactly the bytes in the archive even if the file changes.
            # Stored: weights barely compress, and stored members stream at disk speed.
            h, size = hashlib.sha256(), 0
            big = onnx_path.stat().st_size > 0x7FFF0000
            with open(onnx_path, "rb") as src, zf.open(_zipinfo(MODEL, zipfile.ZIP_STORED), "w", force_zip64=big) as dst:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
            m["sha256"], m["size"] = h.hexdigest(), size
            problem = _manifest_problem(m)
            if problem:
                raise UserInputError(f"invalid manifest: {problem}")
            manifest_bytes = (json.dumps(m, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
            if len(manifest_bytes) > MAX_MANIFEST_BYTES:
                raise UserInputError(f"manifest is {len(manifest_bytes)} bytes; the limit is {MAX_MANIFEST_BYTES}")
            _add(zf, MANIFEST, manifest_bytes, zipfile.ZIP_DEFLATED)
            if key is not None:
                _add(zf, SIGNATURE, base64.b64encode(key.sign(manifest_bytes)) + b"\n", zipfile.ZIP_STORED)
    return out


def _zipinfo(name: str, compress: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible archives
    info.compress_type = compress
    info.create_system = 3  # Unix, so the mode bits below mean what they say
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _add(zf: zipfile.ZipFile, name: str, data: bytes, compress: int) -> None:
    zf.writestr(_zipinfo(name, compress), data)


def read_manifest(path: Union[str, os.PathLike]) -> dict:
    """A package's (or a staged package folder's) manifest, *unverified*: for display only."""
    p = Path(path)
    if p.is_dir():
        f = p / MANIFEST
        if not f.is_file() or f.stat().st_size > MAX_MANIFEST_BYTES:
            raise PackageRejected("missing_member" if not f.is_file() else "member_too_large", str(f))
        return _parse_manifest(f.read_bytes())
    try:
        with zipfile.ZipFile(p) as zf:
            try:
                info = zf.getinfo(MANIFEST)
            except KeyError:
                raise PackageRejected("missing_member", MANIFEST) from None
            with zf.open(info) as src:
                return _parse_manifest(_read_limited(src, MAX_MANIFEST_BYTES, MANIFEST))
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


def _parse_manifest(data: bytes) -> dict:
    try:
        m = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise PackageRejected("bad_manifest", f"not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise PackageRejected("bad_manifest", "not a JSON object")
    return m


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


def check_newer(manifest: dict, active: Optional[dict], force: bool = False) -> None:
    """Refuse a replayed or older package: same ``name`` needs a higher ``version`` than ``active``.

    Re-sending the very package that is active (same version and sha256) is allowed, so a
    retried deploy is idempotent; a different model name starts its own sequence. ``force``
    (``prune-pack deploy --force``) allows a deliberate downgrade.
    """
    if force or not active or active.get("name") != manifest.get("name"):
        return
    new, cur = int(manifest["version"]), int(active.get("version", 0))
    if new > cur or (new == cur and manifest.get("sha256") == active.get("sha256")):
        return
    raise PackageRejected("older_version", f"{manifest.get('name')} v{new} is not newer than the active v{cur}; force to downgrade")


# ------------------------------------------------------------------ verification


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


def _read_limited(src: IO[bytes], limit: int, name: str) -> bytes:
    data = src.read(limit + 1)
    if len(data) > limit:
        raise PackageRejected("member_too_large", f"{name}: more than {limit} bytes")
    return data


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


def _revoked_ids(revoked: Iterable[Union[KeyLike, str]]) -> set[str]:
    """Revoked keys: public key files, key objects, or bare key ids (16 hex digits)."""
    ids = set()
    for r in revoked:
        if isinstance(r, str) and _KEY_ID_RE.match(r) and not os.path.exists(r):
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


def _check_signature(
    manifest: dict, manifest_bytes: bytes, sig_bytes: bytes, trusted: Sequence[KeyLike], revoked: Iterable[Union[KeyLike, str]]
) -> str:
    """The id of the trusted key whose signature this is, or PackageRejected."""
    sig = _parse_signature(sig_bytes)
    revoked_ids = _revoked_ids(revoked)
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
                manifest_bytes = _read_limited(src, MAX_MANIFEST_BYTES, MANIFEST)
            manifest = _parse_manifest(manifest_bytes)
            schema = manifest.get("schema")
            if schema != MANIFEST_SCHEMA or isinstance(schema, bool):
                raise PackageRejected("unknown_schema", f"schema {schema!r}; this agent reads schema {MANIFEST_SCHEMA}")
            problem = _manifest_problem(manifest)
            if problem:
                raise PackageRejected("bad_manifest", problem)

            kid: Optional[str] = None
            if SIGNATURE in infos:
                with zf.open(infos[SIGNATURE]) as src:
                    sig_bytes = _read_limited(src, MAX_SIGNATURE_BYTES, SIGNATURE)
                # A signature that is present is always checked, even when unsigned is allowed.
                kid = _check_signature(manifest, manifest_bytes, sig_bytes, trusted_keys, revoked_keys)
            elif not allow_unsigned:
                raise PackageRejected("unsigned", "the package has no signature")

            # From here on the manifest is authentic (or explicitly allowed unsigned).
            model_info = infos[MODEL]
            if model_info.file_size != manifest["size"]:
                raise PackageRejected("size_mismatch", f"model.onnx is {model_info.file_size} bytes, the manifest says {manifest['size']}")

            if staging_root is not None:
                Path(staging_root).mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix="ppk-", dir=staging_root))
            h = hashlib.sha256()
            try:
                n = _extract(zf, model_info, stage / MODEL, manifest["size"], h)
            except zipfile.BadZipFile as e:
                if "CRC" in str(e):  # the stored bytes were altered after packing
                    raise PackageRejected("hash_mismatch", f"model.onnx: {e}") from None
                raise
            if n != manifest["size"]:
                raise PackageRejected("size_mismatch", f"model.onnx streamed {n} bytes, the manifest says {manifest['size']}")
            if h.hexdigest() != manifest["sha256"]:
                raise PackageRejected("hash_mismatch", f"model.onnx sha256 {h.hexdigest()[:12]}…, the manifest says {manifest['sha256'][:12]}…")
            # The verified bytes themselves, not a second read of the archive.
            fd = os.open(stage / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(manifest_bytes)
                f.flush()
                os.fsync(f.fileno())
            if SIGNATURE in infos:
                (stage / SIGNATURE).write_bytes(sig_bytes)
            _fsync_dir(stage)
        return VerifiedPackage(dir=stage, manifest=manifest, model_path=stage / MODEL, key_id=kid, signed=kid is not None)
    except BaseException as e:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        # Corrupt local headers or deflate streams surface only while reading.
        if isinstance(e, (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error)):
            raise PackageRejected("not_a_package", f"{p}: {e}") from None
        raise


# ------------------------------------------------------------------ CLI


def cli_verify(args: Any, cfg: Any) -> dict:
    """``prune-pack verify PACKAGE [--pubkey FILE ...] [--allow-unsigned]``: exit 0 only when valid."""
    agent = getattr(cfg, "agent", None)
    trusted = list(getattr(args, "pubkey", None) or (agent.trusted_keys if agent else []))
    revoked = list(agent.revoked_keys) if agent else []
    max_bytes = int((agent.max_package_mb if agent else DEFAULT_MAX_BYTES / MiB) * MiB)
    allow_unsigned = bool(getattr(args, "allow_unsigned", False) or (agent.allow_unsigned if agent else False))
    pkg = verify_package(args.package, trusted, revoked, max_bytes=max_bytes, allow_unsigned=allow_unsigned)
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
