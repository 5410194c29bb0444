"""The built-in demo: a deterministic synthetic dataset (nothing downloaded) and the shipped checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from prune_pack.deploy import demo


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".jpg", ".txt", ".yaml"):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_dataset_is_deterministic_complete_and_has_a_val_split(tmp_path):
    a = demo.ensure_demo_dataset(tmp_path / "a", n_train=6, n_val=3)
    b = demo.ensure_demo_dataset(tmp_path / "b", n_train=6, n_val=3)
    assert _digest(a.parent) == _digest(b.parent)
    cfg = yaml.safe_load(a.read_text())
    assert cfg["names"] == dict(enumerate(demo.CLASSES))
    assert len(list((a.parent / "images" / "val").glob("*.jpg"))) == 3
    labels = [ln.split() for f in sorted((a.parent / "labels").rglob("*.txt")) for ln in f.read_text().splitlines()]
    assert labels and all(len(x) == 5 and 0 <= int(x[0]) < len(demo.CLASSES) for x in labels)
    assert all(0 < float(v) <= 1 for x in labels for v in x[1:])
    # a second call reuses the finished folder; a half-written one (no marker) is regenerated
    mtime = a.stat().st_mtime_ns
    assert demo.ensure_demo_dataset(tmp_path / "a", n_train=6, n_val=3).stat().st_mtime_ns == mtime
    (a.parent / ".complete").unlink()
    (a.parent / "images" / "val" / "val_0000.jpg").unlink()
    demo.ensure_demo_dataset(tmp_path / "a", n_train=6, n_val=3)
    assert _digest(a.parent) == _digest(b.parent)


def test_dataset_resolves_with_the_offline_resolver(tmp_path):
    from prune_pack.pruning.sources import dataset_images, resolve_dataset

    y = demo.ensure_demo_dataset(tmp_path / "d", n_train=4, n_val=2)
    r = resolve_dataset(y, tmp_path / "w")
    assert len(dataset_images(r, "val")) == 2 and len(dataset_images(r, "train")) == 4


def test_shipped_demo_checkpoint_is_small_and_matches_the_dataset():
    pytest.importorskip("torch")
    pt = demo.demo_model()
    assert pt.stat().st_size < 7 * 1024 * 1024  # small enough for git
    from prune_pack.pruning.checkpoint import load_checkpoint

    yolo, prov = load_checkpoint(pt)
    assert dict(yolo.names) == dict(enumerate(demo.CLASSES)) and prov == {}
