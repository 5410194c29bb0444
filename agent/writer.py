"""The package writer: ``write_package`` packs an ONNX file and its manifest into a ``.ppk``
(a zip of ``manifest.json``, ``model.onnx`` stored, and a detached Ed25519 ``signature`` over the
exact manifest bytes; the manifest pins the model by sha256 and size, so one signature covers both).

Imports agent.manifest, agent.keys, agent.fsutil and ``prune_pack``'s version and errors.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Optional, Union

from prune_pack import __version__
from prune_pack.agent.fsutil import atomic_file
from prune_pack.agent.keys import PrivateKeyLike, key_id, load_private_key, next_version
from prune_pack.agent.manifest import (
    _CHUNK,
    _NAME_RE,
    MANIFEST,
    MANIFEST_SCHEMA,
    MAX_MANIFEST_BYTES,
    MODEL,
    SIGNATURE,
    jsonable,
    manifest_problem,
    onnx_input,
)
from prune_pack.errors import UserInputError


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
    m = jsonable(dict(manifest))
    m.pop("signer", None)
    if "name" not in m:
        raise UserInputError("manifest needs a 'name'")
    if "precision" not in m:
        raise UserInputError("manifest needs a 'precision' (fp32, int8, ...)")
    m["schema"] = MANIFEST_SCHEMA
    m.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"))
    m.setdefault("prune_pack_version", __version__)
    if m.get("input") is None:
        inp = onnx_input(onnx_path)
        if inp is not None:
            m["input"] = inp
    key = load_private_key(signing_key) if signing_key is not None else None
    if key is not None:
        m["signer"] = key_id(key)
    # Fail before copying (and before using up a version number) on what is already known.
    problem = manifest_problem({"version": 1, **m, "sha256": "0" * 64, "size": 0})
    if problem:
        raise UserInputError(f"invalid manifest: {problem}")
    if "version" not in m and isinstance(m.get("name"), str) and _NAME_RE.match(m["name"]):
        m["version"] = next_version(m["name"], registry)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
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
            problem = manifest_problem(m)
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
