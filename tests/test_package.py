"""agent.package: .ppk round trip, every tamper case with its reason, keys, versions, CLI.

Device-side: no torch. The model is the committed ``tests/data/tiny.onnx`` (real ONNX Runtime);
tampered archives are built with the stdlib ``zipfile`` and signed with ``cryptography`` directly,
independent of the code under test.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import struct
import subprocess
import sys
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_pack.agent import keys as K
from prune_pack.agent import manifest as M
from prune_pack.agent import verifier as V
from prune_pack.agent import writer as W
from prune_pack.cli import main
from prune_pack.errors import PackageRejected, UserInputError

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny.onnx"


# ------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    """Version registry and default key go to a temp XDG dir, never the user's ~/.config."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("keys")
    return {n: K.generate_keypair(root / n) for n in ("a", "b", "evil")}


@pytest.fixture
def stage(tmp_path) -> Path:
    d = tmp_path / "stage"
    d.mkdir()
    return d


def manifest(**over) -> dict:
    m = {
        "name": "tiny",
        "version": 3,
        "precision": "fp32",
        "names": ["person", "car", "dog"],
        "validated": [{"backend": "ort", "precision": "fp32"}],
        "provenance": {"base_sha256": "0" * 64, "criterion": "l1", "ratio": 0.3},
        "metrics": {"map50_95": 0.0, "map50": 0.0, "params": 1234, "gflops": 0.01, "host_latency": {"ms": 1.5, "threads": 2, "imgsz": 64}},
    }
    m.update(over)
    return m


@pytest.fixture
def pkg(tmp_path, keys) -> Path:
    return W.write_package(TINY, manifest(), tmp_path / "tiny.ppk", keys["a"][0])


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def zipinfo(name: str, mode: int = stat.S_IFREG | 0o644, compress: int = zipfile.ZIP_STORED) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = mode << 16
    info.compress_type = compress
    return info


def repack(out: Path, entries: list) -> Path:
    """Write a zip from (name | ZipInfo, bytes) pairs, duplicates allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names, which one test wants
        with zipfile.ZipFile(out, "w") as zf:
            for name, data in entries:
                zf.writestr(name if isinstance(name, zipfile.ZipInfo) else zipinfo(name), data)
    return out


def sign(key_path: Path, data: bytes) -> bytes:
    key = K.load_private_key(key_path)
    assert isinstance(key, Ed25519PrivateKey)
    return base64.b64encode(key.sign(data))


def signed_package(out: Path, m: dict, model: bytes, key_path: Path) -> Path:
    mb = json.dumps(m).encode()
    return repack(out, [("manifest.json", mb), ("model.onnx", model), ("signature", sign(key_path, mb))])


def assert_rejected(reason: str, path: Path, stage: Path, trusted, **kw) -> PackageRejected:
    with pytest.raises(PackageRejected) as ei:
        V.verify_package(path, trusted, staging_root=stage, **kw)
    assert ei.value.reason == reason, str(ei.value)
    assert ei.value.reason in M.REASONS
    assert list(stage.iterdir()) == [], "a rejected package left files behind"
    return ei.value


# ------------------------------------------------------------------ round trip


def test_round_trip_runs_in_onnxruntime(pkg, keys, stage):
    v = V.verify_package(pkg, [keys["a"][1]], staging_root=stage)
    assert v.signed and v.key_id == K.key_id(keys["a"][1])
    assert v.dir.parent == stage and v.model_path == v.dir / "model.onnx"
    assert v.model_path.read_bytes() == TINY.read_bytes()
    assert json.loads(v.manifest_path.read_bytes()) == v.manifest == M.read_manifest(pkg)
    m = v.manifest
    assert (m["schema"], m["name"], m["version"], m["precision"]) == (M.MANIFEST_SCHEMA, "tiny", 3, "fp32")
    assert m["size"] == TINY.stat().st_size and m["signer"] == v.key_id
    assert m["prune_pack_version"] and m["created"].endswith("Z")
    # input spec read from the model itself; the staged model really runs.
    assert m["input"] == {"name": "images", "shape": [1, 3, 64, 64], "dtype": "float32"}
    sess = ort.InferenceSession(str(v.model_path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {m["input"]["name"]: np.zeros(m["input"]["shape"], np.float32)})
    assert y.shape == (1, 4 + len(m["names"]), 256)
    assert M.read_manifest(v.dir) == m
    v.discard()
    assert not v.dir.exists()


def test_manifest_values_are_made_json(tmp_path, keys, stage):
    m = manifest(metrics={"map50": float("nan"), "params": np.int64(7), "gflops": np.float32(0.5)}, shape=(1, 2))
    out = W.write_package(TINY, m, tmp_path / "t.ppk", keys["a"][0])
    got = V.verify_package(out, [keys["a"][1]], staging_root=stage).manifest
    assert got["metrics"] == {"map50": None, "params": 7, "gflops": 0.5} and got["shape"] == [1, 2]


def test_write_is_atomic_and_validates(tmp_path, keys):
    out = tmp_path / "o" / "x.ppk"
    for bad in (manifest(name="../etc"), manifest(version=0), {"name": "x"}):
        with pytest.raises(UserInputError):
            W.write_package(TINY, bad, out, keys["a"][0])
    with pytest.raises(UserInputError, match="not found"):
        W.write_package(tmp_path / "missing.onnx", manifest(), out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    # an existing package is replaced whole, and no temp files stay behind
    W.write_package(TINY, manifest(version=1), out, keys["a"][0])
    W.write_package(TINY, manifest(version=2), out, keys["a"][0])
    assert [p.name for p in out.parent.iterdir()] == ["x.ppk"]
    assert M.read_manifest(out)["version"] == 2


def test_default_version_comes_from_the_counter(tmp_path):
    m = manifest()
    del m["version"]
    versions = [M.read_manifest(W.write_package(TINY, m, tmp_path / f"{i}.ppk"))["version"] for i in range(3)]
    assert versions == [1, 2, 3]


# ------------------------------------------------------------------ tampering


def test_flipped_model_byte_repacked_is_hash_mismatch(pkg, keys, stage, tmp_path):
    mem = members(pkg)
    model = bytearray(mem["model.onnx"])
    model[len(model) // 2] ^= 0x01
    bad = repack(tmp_path / "bad.ppk", [("manifest.json", mem["manifest.json"]), ("model.onnx", bytes(model)), ("signature", mem["signature"])])
    assert_rejected("hash_mismatch", bad, stage, [keys["a"][1]])


def test_flipped_byte_in_the_archive_is_hash_mismatch(pkg, keys, stage, tmp_path):
    raw = bytearray(pkg.read_bytes())
    model = TINY.read_bytes()
    at = raw.find(model[1000:1032]) + 16  # inside the stored model data
    raw[at] ^= 0xFF
    bad = tmp_path / "bad.ppk"
    bad.write_bytes(bytes(raw))
    assert_rejected("hash_mismatch", bad, stage, [keys["a"][1]])


def test_modified_manifest_is_bad_signature(pkg, keys, stage, tmp_path):
    mem = members(pkg)
    m = json.loads(mem["manifest.json"])
    m["version"] += 100  # e.g. to defeat the device's replay protection
    bad = repack(tmp_path / "bad.ppk", [("manifest.json", json.dumps(m).encode()), ("model.onnx", mem["model.onnx"]), ("signature", mem["signature"])])
    assert_rejected("bad_signature", bad, stage, [keys["a"][1]])


def test_whitespace_in_manifest_is_bad_signature(pkg, keys, stage, tmp_path):
    mem = members(pkg)
    bad = repack(tmp_path / "bad.ppk", [("manifest.json", mem["manifest.json"] + b" "), ("model.onnx", mem["model.onnx"]), ("signature", mem["signature"])])
    assert_rejected("bad_signature", bad, stage, [keys["a"][1]])


def test_swapped_signature_is_bad_signature(pkg, keys, stage, tmp_path):
    other = W.write_package(TINY, manifest(version=4), tmp_path / "other.ppk", keys["a"][0])
    mem = members(pkg)
    mem["signature"] = members(other)["signature"]  # valid signature by the same key, other manifest
    assert_rejected("bad_signature", repack(tmp_path / "bad.ppk", list(mem.items())), stage, [keys["a"][1]])


@pytest.mark.parametrize("sig", [b"", b"not base64 !!", base64.b64encode(b"x" * 63), b"\x00" * 64])
def test_malformed_signature_is_bad_signature(pkg, keys, stage, tmp_path, sig):
    mem = members(pkg)
    mem["signature"] = sig
    assert_rejected("bad_signature", repack(tmp_path / "bad.ppk", list(mem.items())), stage, [keys["a"][1]])


def test_raw_signature_bytes_are_accepted(pkg, keys, stage, tmp_path):
    mem = members(pkg)
    mem["signature"] = base64.b64decode(mem["signature"])
    v = V.verify_package(repack(tmp_path / "raw.ppk", list(mem.items())), [keys["a"][1]], staging_root=stage)
    assert v.signed


def test_other_key_is_untrusted(tmp_path, keys, stage):
    evil = W.write_package(TINY, manifest(), tmp_path / "evil.ppk", keys["evil"][0])
    e = assert_rejected("untrusted_key", evil, stage, [keys["a"][1], keys["b"][1]])
    assert K.key_id(keys["evil"][1]) in e.detail


def test_other_key_claiming_a_trusted_signer_is_bad_signature(pkg, keys, stage, tmp_path):
    # The signer hint is only a hint: a forged hint pointing at a trusted key changes nothing.
    m = json.loads(members(pkg)["manifest.json"])
    bad = signed_package(tmp_path / "bad.ppk", m, TINY.read_bytes(), keys["evil"][0])
    assert_rejected("bad_signature", bad, stage, [keys["a"][1]])


def test_no_trusted_keys_rejects_signed(pkg, stage):
    assert_rejected("untrusted_key", pkg, stage, [])


def test_missing_signature_is_unsigned_unless_allowed(tmp_path, keys, stage):
    out = W.write_package(TINY, manifest(), tmp_path / "u.ppk", None)
    assert_rejected("unsigned", out, stage, [keys["a"][1]])
    v = V.verify_package(out, [], allow_unsigned=True, staging_root=stage)
    assert (v.signed, v.key_id) == (False, None)
    # allow_unsigned never excuses a signature that is present but wrong
    mem = members(out)
    mem["signature"] = members(W.write_package(TINY, manifest(version=9), tmp_path / "s.ppk", keys["a"][0]))["signature"]
    v.discard()
    assert_rejected("bad_signature", repack(tmp_path / "bad.ppk", list(mem.items())), stage, [keys["a"][1]], allow_unsigned=True)


@pytest.mark.parametrize("name", ["../model.onnx", "/model.onnx", "a/../../x", "..\\x", "C:/x", "./model.onnx", "a//b"])
def test_zip_slip_names_are_rejected(pkg, keys, stage, tmp_path, name):
    mem = members(pkg)
    bad = repack(tmp_path / "bad.ppk", list(mem.items()) + [(name, b"owned")])
    assert_rejected("bad_member_name", bad, stage, [keys["a"][1]])
    assert not (tmp_path / "model.onnx").exists() and not (stage.parent / "x").exists()


def test_symlink_member_is_rejected(pkg, keys, stage, tmp_path):
    mem = members(pkg)
    entries = [("manifest.json", mem["manifest.json"]), (zipinfo("model.onnx", stat.S_IFLNK | 0o777), b"/etc/passwd"), ("signature", mem["signature"])]
    assert_rejected("link_member", repack(tmp_path / "bad.ppk", entries), stage, [keys["a"][1]])


def test_directory_member_is_rejected(pkg, keys, stage, tmp_path):
    entries = list(members(pkg).items()) + [(zipinfo("x/", stat.S_IFDIR | 0o755), b"")]
    assert_rejected("unexpected_member", repack(tmp_path / "bad.ppk", entries), stage, [keys["a"][1]])


def test_duplicate_member_is_rejected(pkg, keys, stage, tmp_path):
    mem = members(pkg)
    entries = list(mem.items()) + [("model.onnx", b"a different model")]
    assert_rejected("duplicate_member", repack(tmp_path / "bad.ppk", entries), stage, [keys["a"][1]])


def test_extra_and_missing_members(pkg, keys, stage, tmp_path):
    mem = members(pkg)
    assert_rejected("unexpected_member", repack(tmp_path / "x.ppk", list(mem.items()) + [("run.sh", b"#!/bin/sh")]), stage, [keys["a"][1]])
    del mem["model.onnx"]
    assert_rejected("missing_member", repack(tmp_path / "y.ppk", list(mem.items())), stage, [keys["a"][1]])


def test_oversize_package_and_member(pkg, keys, stage, tmp_path):
    assert_rejected("too_large", pkg, stage, [keys["a"][1]], max_bytes=pkg.stat().st_size - 1)
    junk = tmp_path / "junk.ppk"  # the file size is checked before the archive is even parsed
    junk.write_bytes(b"\0" * 2000)
    assert_rejected("too_large", junk, stage, [], max_bytes=1000)
    # each member under the limit, the file small, but together over it once extracted
    parts = [(zipinfo("manifest.json", compress=zipfile.ZIP_DEFLATED), b"{}" + b" " * 30_000), (zipinfo("model.onnx", compress=zipfile.ZIP_DEFLATED), bytes(60_000))]
    assert_rejected("too_large", repack(tmp_path / "sum.ppk", parts), stage, [], max_bytes=80_000)
    # A deflated member can be small in the archive but too large once extracted.
    model = bytes(200_000)
    m = manifest(sha256="0" * 64, size=len(model), schema=1)
    mb = json.dumps(m).encode()
    big = repack(tmp_path / "big.ppk", [("manifest.json", mb), (zipinfo("model.onnx", compress=zipfile.ZIP_DEFLATED), model), ("signature", sign(keys["a"][0], mb))])
    assert big.stat().st_size < 50_000
    assert_rejected("member_too_large", big, stage, [keys["a"][1]], max_bytes=100_000)
    # oversized manifest (limit 1 MiB regardless of max_bytes)
    huge = repack(tmp_path / "huge.ppk", [(zipinfo("manifest.json", compress=zipfile.ZIP_DEFLATED), b" " * (M.MAX_MANIFEST_BYTES + 1)), ("model.onnx", b"")])
    assert_rejected("member_too_large", huge, stage, [keys["a"][1]])


def test_zip_bomb_is_rejected(keys, stage, tmp_path):
    model = bytes(4 * M.MiB)
    bomb = repack(tmp_path / "bomb.ppk", [("manifest.json", b"{}"), (zipinfo("model.onnx", compress=zipfile.ZIP_DEFLATED), model)])
    assert bomb.stat().st_size < 50_000
    assert_rejected("zip_bomb", bomb, stage, [keys["a"][1]])


def _patch_central_size(path: Path, name: bytes, new_size: int) -> None:
    """Make the central directory lie about a member's uncompressed size."""
    raw = bytearray(path.read_bytes())
    i = 0
    while (i := raw.find(b"PK\x01\x02", i)) >= 0:
        n = struct.unpack_from("<H", raw, i + 28)[0]
        if raw[i + 46 : i + 46 + n] == name:
            struct.pack_into("<I", raw, i + 24, new_size)
        i += 4
    path.write_bytes(bytes(raw))


def test_lying_declared_size_never_writes_more(tmp_path, stage):
    # The archive declares 1000 bytes but the deflate stream holds 300 000 (unsigned, so the
    # manifest can agree with the lie): extraction must stop at the declared size and reject.
    rng = np.random.default_rng(0)
    model = rng.integers(0, 4, 300_000, dtype=np.uint8).tobytes()
    m = manifest(sha256="0" * 64, size=1000, schema=1)
    bad = repack(tmp_path / "lie.ppk", [("manifest.json", json.dumps(m).encode()), (zipinfo("model.onnx", compress=zipfile.ZIP_DEFLATED), model)])
    _patch_central_size(bad, b"model.onnx", 1000)
    e = assert_rejected("hash_mismatch", bad, stage, [], allow_unsigned=True)
    assert "CRC" in e.detail


def test_unknown_schema(keys, stage, tmp_path):
    m = json.loads(members(W.write_package(TINY, manifest(), tmp_path / "ok.ppk", keys["a"][0]))["manifest.json"])
    for schema in (2, "1", None, True):
        bad = signed_package(tmp_path / "s.ppk", {**m, "schema": schema}, TINY.read_bytes(), keys["a"][0])
        assert_rejected("unknown_schema", bad, stage, [keys["a"][1]])


def test_signed_but_wrong_size_is_size_mismatch(keys, stage, tmp_path):
    m = json.loads(members(W.write_package(TINY, manifest(), tmp_path / "ok.ppk", keys["a"][0]))["manifest.json"])
    bad = signed_package(tmp_path / "s.ppk", {**m, "size": m["size"] + 1}, TINY.read_bytes(), keys["a"][0])
    assert_rejected("size_mismatch", bad, stage, [keys["a"][1]])


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", b'{"schema": 1, "schema": 1}', b'{"schema": 1, "x": NaN}', json.dumps({"schema": 1, "name": "x"}).encode()],
)
def test_bad_manifest(keys, stage, tmp_path, data):
    bad = repack(tmp_path / "m.ppk", [("manifest.json", data), ("model.onnx", b""), ("signature", sign(keys["a"][0], data))])
    assert_rejected("bad_manifest", bad, stage, [keys["a"][1]])


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", os.urandom(256)])
def test_not_a_package(tmp_path, stage, content):
    f = tmp_path / "x.ppk"
    f.write_bytes(content)
    assert_rejected("not_a_package", f, stage, [])
    assert_rejected("not_a_package", tmp_path / "missing.ppk", stage, [])
    assert_rejected("not_a_package", stage, stage, [])  # a directory


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_is_rejected_or_harmless(pkg, keys, tmp_path, data):
    """Any flipped byte: either a clean rejection or (when it hits bytes nothing reads) the same model."""
    raw = bytearray(pkg.read_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    bad = tmp_path / "fuzz.ppk"
    bad.write_bytes(bytes(raw))
    stage = tmp_path / "fuzz-stage"
    stage.mkdir(exist_ok=True)
    try:
        v = V.verify_package(bad, [keys["a"][1]], staging_root=stage)
    except PackageRejected as e:
        assert e.reason in M.REASONS
        assert list(stage.iterdir()) == []
    else:
        assert v.model_path.read_bytes() == TINY.read_bytes()
        v.discard()


# ------------------------------------------------------------------ keys


def test_key_rotation_two_trusted_keys(tmp_path, keys, stage):
    old = W.write_package(TINY, manifest(version=1), tmp_path / "old.ppk", keys["a"][0])
    new = W.write_package(TINY, manifest(version=2), tmp_path / "new.ppk", keys["b"][0])
    trusted = [keys["a"][1], keys["b"][1]]
    assert V.verify_package(old, trusted, staging_root=stage).key_id == K.key_id(keys["a"][1])
    assert V.verify_package(new, trusted, staging_root=stage).key_id == K.key_id(keys["b"][1])
    # after rotation the old key is dropped: its packages stop verifying
    for d in stage.iterdir():
        d.rename(tmp_path / d.name)
    assert_rejected("untrusted_key", old, stage, [keys["b"][1]])


def test_revoked_wins_over_trusted(pkg, keys, stage):
    trusted = [keys["a"][1], keys["b"][1]]
    assert_rejected("revoked_key", pkg, stage, trusted, revoked_keys=[keys["a"][1]])
    assert_rejected("revoked_key", pkg, stage, trusted, revoked_keys=[K.key_id(keys["a"][1])])  # by id
    assert_rejected("revoked_key", pkg, stage, [keys["b"][1]], revoked_keys=[keys["a"][1]])  # revoked, not trusted
    V.verify_package(pkg, trusted, revoked_keys=[keys["b"][1]], staging_root=stage)  # other key revoked: fine


def test_revocation_does_not_rely_on_the_signer_hint(pkg, keys, stage, tmp_path):
    # A manifest signed without the (unauthenticated-until-verified) signer field, e.g. by
    # another tool: the key is found by trying the trusted keys, and revocation still wins.
    m = json.loads(members(pkg)["manifest.json"])
    del m["signer"]
    nohint = signed_package(tmp_path / "nohint.ppk", m, TINY.read_bytes(), keys["a"][0])
    assert V.verify_package(nohint, [keys["b"][1], keys["a"][1]], staging_root=stage).key_id == K.key_id(keys["a"][1])
    for d in stage.iterdir():
        d.rename(tmp_path / d.name)
    assert_rejected("revoked_key", nohint, stage, [keys["a"][1]], revoked_keys=[keys["a"][1]])
    assert_rejected("bad_signature", nohint, stage, [keys["b"][1]])  # without a hint: cannot tell


def test_key_files(tmp_path, keys):
    priv, pub = keys["a"]
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert K.key_id(priv.with_suffix(".pub")) == K.key_id(K.load_private_key(priv)) == K.key_id(pub)
    assert len(K.key_id(pub)) == 16 and K.key_id(pub) != K.key_id(keys["b"][1])
    with pytest.raises(UserInputError, match="exists"):
        K.generate_keypair(priv.parent)
    with pytest.raises(UserInputError):
        K.load_public_key(priv)  # a private key is not a public key file
    with pytest.raises(UserInputError):
        K.load_private_key(pub)
    with pytest.raises(UserInputError, match="not found"):
        K.load_public_key(tmp_path / "nope.pub")


def test_default_key_is_created_once(tmp_path):
    path, created = K.ensure_default_key()
    assert created and path == tmp_path / "xdg" / "prune-pack" / "signing.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert K.ensure_default_key() == (path, False)


# ------------------------------------------------------------------ versions, validation


def test_version_counter_increases_per_name(tmp_path):
    assert [K.next_version("a") for _ in range(3)] == [1, 2, 3]
    assert K.next_version("b") == 1
    K.record_version("a", 10)
    K.record_version("a", 5)  # never lowers
    assert K.next_version("a") == 11
    reg = tmp_path / "xdg" / "prune-pack" / "versions.json"
    assert json.loads(reg.read_text()) == {"a": 11, "b": 1}
    reg.write_text("{broken")
    with pytest.raises(UserInputError, match="corrupt"):
        K.next_version("a")


def test_version_counter_is_locked_across_processes(tmp_path):
    reg = tmp_path / "versions.json"
    with ProcessPoolExecutor(4) as ex:
        got = list(ex.map(K.next_version, ["m"] * 24, [reg] * 24))
    assert sorted(got) == list(range(1, 25))


def test_check_validated():
    m = manifest(precision="int8", validated=[{"backend": "ort", "precision": "int8"}, {"backend": "openvino", "precision": "fp32"}])
    assert M.check_validated(m, "ort") == "int8"
    assert M.check_validated(m, "openvino", "fp32") == "fp32"
    with pytest.raises(PackageRejected) as ei:
        M.check_validated(m, "openvino", "int8")
    assert ei.value.reason == "not_validated"
    assert M.check_validated(m, "openvino", "int8", force=True) == "int8"
    legacy = {"precision": "fp32"}  # no validated list: its own precision on any backend
    assert M.check_validated(legacy, "openvino") == "fp32"
    with pytest.raises(PackageRejected):
        M.check_validated(legacy, "ort", "bf16")


def test_check_newer_refuses_replays():
    active = manifest(version=5, sha256="a" * 64)
    M.check_newer(manifest(version=6, sha256="b" * 64), active)
    M.check_newer(manifest(version=5, sha256="a" * 64), active)  # the same package again: idempotent
    M.check_newer(manifest(name="other", version=1), active)  # another model: its own sequence
    M.check_newer(manifest(version=1), None)
    for old in (manifest(version=4, sha256="c" * 64), manifest(version=5, sha256="c" * 64)):
        with pytest.raises(PackageRejected) as ei:
            M.check_newer(old, active)
        assert ei.value.reason == "older_version"
        M.check_newer(old, active, force=True)


def test_agent_import_stays_torch_free():
    code = (
        "import sys, prune_pack.agent.package, prune_pack.agent.daemon, prune_pack.agent.commands; "
        "bad = [m for m in ('torch', 'ultralytics', 'onnx', 'prune_pack.deploy', 'prune_pack.pruning') if m in sys.modules]; "
        "sys.exit(repr(bad) if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ CLI


def test_cli_keys_init_and_verify(tmp_path, capsys):
    kdir = tmp_path / "k"
    assert main(["keys", "init", "--out", str(kdir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stat.S_IMODE((kdir / "signing.key").stat().st_mode) == 0o600
    assert out["key_id"] == K.key_id(kdir / "signing.pub")
    assert main(["keys", "init", "--out", str(kdir)]) == 2  # refuses to overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["keys", "init", "--out", str(kdir), "--force"]) == 0
    assert K.key_id(kdir / "signing.pub") != out["key_id"]

    pkg = W.write_package(TINY, manifest(), tmp_path / "t.ppk", kdir / "signing.key")
    capsys.readouterr()
    assert main(["verify", str(pkg), "--pubkey", str(kdir / "signing.pub"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["ok"] and (res["name"], res["version"], res["precision"]) == ("tiny", 3, "fp32")
    assert res["key_id"] == K.key_id(kdir / "signing.pub") and len(res["sha256"]) == 64

    other = tmp_path / "other"
    K.generate_keypair(other)
    assert main(["verify", str(pkg), "--pubkey", str(other / "signing.pub")]) == PackageRejected.exit_code
    assert "untrusted_key" in capsys.readouterr().err
    assert main(["verify", str(pkg)]) == PackageRejected.exit_code  # no trusted keys at all

    # trusted and revoked keys from the config file; --pubkey wins over the config
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"agent:\n  trusted_keys: [{kdir / 'signing.pub'}]\n")
    assert main(["verify", str(pkg), "--config", str(cfg)]) == 0
    cfg.write_text(f"agent:\n  trusted_keys: [{kdir / 'signing.pub'}]\n  revoked_keys: [{kdir / 'signing.pub'}]\n")
    assert main(["verify", str(pkg), "--config", str(cfg)]) == PackageRejected.exit_code
    assert "revoked_key" in capsys.readouterr().err


def test_cli_verify_exit_codes_as_a_process(tmp_path, keys):
    pkg = W.write_package(TINY, manifest(), tmp_path / "t.ppk", keys["a"][0])
    exe = [sys.executable, "-m", "prune_pack.cli"]
    ok = subprocess.run(exe + ["verify", str(pkg), "--pubkey", str(keys["a"][1]), "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["ok"] is True
    raw = bytearray(pkg.read_bytes())
    raw[raw.find(TINY.read_bytes()[2000:2032]) + 3] ^= 0x55
    (tmp_path / "bad.ppk").write_bytes(bytes(raw))
    bad = subprocess.run(exe + ["verify", str(tmp_path / "bad.ppk"), "--pubkey", str(keys["a"][1])], capture_output=True, text=True)
    assert bad.returncode == PackageRejected.exit_code != 0
    assert bad.stderr.count("\n") == 1 and "hash_mismatch" in bad.stderr


# ------------------------------------------------------------------ test asset


def test_tiny_onnx_is_reproducible():
    pytest.importorskip("onnx")
    sys.path.insert(0, str(DATA))
    try:
        import make_tiny_onnx
    finally:
        sys.path.remove(str(DATA))
    assert make_tiny_onnx.build().SerializeToString() == TINY.read_bytes(), "rerun tests/data/make_tiny_onnx.py"
