"""Offline-safe resolution of models and datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from prune_pack.errors import OfflineError, UserInputError
from prune_pack.pruning.sources import dataset_images, resolve_dataset, resolve_model


def _dataset(root: Path, path_value=".", val=True) -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "images" / split / "a.jpg").write_bytes(b"\xff\xd8")
    cfg = {"path": path_value, "train": "images/train", "names": {0: "part"}}
    if val:
        cfg["val"] = "images/val"
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    return root / "data.yaml"


def test_relative_path_resolves_against_yaml_folder(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)  # a cwd where "." would be wrong
    out = resolve_dataset(data, tmp_path / "work")
    cfg = yaml.safe_load(out.read_text())
    assert cfg["path"] == str((tmp_path / "ds").resolve())
    assert cfg["nc"] == 1 and cfg["names"] == {0: "part"}
    assert out.parent == tmp_path / "work"  # never written beside the (maybe read-only) source
    assert dataset_images(out, "val") == [tmp_path / "ds" / "images" / "val" / "a.jpg"]


def test_shared_dataset_yaml_resolves(tmp_path):
    from conftest import shared_path

    out = resolve_dataset(shared_path("data", "coco128", "data.yaml"), tmp_path)
    assert len(dataset_images(out, "val")) == 128
    assert yaml.safe_load(out.read_text())["nc"] == 80


def test_missing_split_folder_is_named(tmp_path):
    data = _dataset(tmp_path / "ds")
    d = yaml.safe_load(data.read_text())
    d["val"] = "images/validation"
    data.write_text(yaml.safe_dump(d))
    with pytest.raises(UserInputError, match="val folder 'images/validation'"):
        resolve_dataset(data, tmp_path / "work")
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_no_val_split(tmp_path):
    with pytest.raises(UserInputError, match="no 'val' split"):
        resolve_dataset(_dataset(tmp_path / "ds", val=False), tmp_path / "work")


@pytest.mark.parametrize("name", ["coco8.yaml", "coco128"])
def test_hub_dataset_names_fail_offline_with_advice(name, tmp_path):
    with pytest.raises(OfflineError, match="never downloads datasets.*--data"):
        resolve_dataset(name, tmp_path)


@pytest.mark.parametrize("name", ["yolov8n.pt", "yolo11s.pt"])
def test_hub_model_names_fail_offline_with_advice(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OfflineError, match="never downloads weights.*--model"):
        resolve_model(name)


def test_model_checks(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        resolve_model(tmp_path / "missing.pt")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(UserInputError, match="expected an Ultralytics .pt"):
        resolve_model(onnx)


def test_read_only_dataset_is_mirrored_so_caches_land_elsewhere(tmp_path):
    """Ultralytics writes labels/<split>.cache beside the labels; a read-only dataset (like
    ../shared on CI) must get a writable mirror instead, with the same images and labels."""
    ds = tmp_path / "ds"
    data = _dataset(ds)
    for split in ("train", "val"):
        (ds / "labels" / split).mkdir(parents=True)
        (ds / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    for d in sorted(ds.rglob("*"), reverse=True) + [ds]:
        d.chmod(d.stat().st_mode & ~0o222)
    try:
        out = resolve_dataset(data, tmp_path / "work")
        root = Path(yaml.safe_load(out.read_text())["path"])
        assert root.is_relative_to(tmp_path / "work")
        img = root / "images" / "val" / "a.jpg"
        assert img.is_symlink() and img.resolve() == (ds / "images" / "val" / "a.jpg").resolve()
        assert (root / "labels" / "val" / "a.txt").read_text() == "0 0.5 0.5 0.2 0.2\n"
        assert dataset_images(out, "val") == [img]
    finally:
        for d in [ds] + sorted(ds.rglob("*")):
            d.chmod(d.stat().st_mode | 0o200)


def test_median_aspect_reads_headers_and_skips_unreadable_files(tmp_path):
    import cv2

    from prune_pack.pruning.sources import median_aspect

    files = []
    for i, (h, w) in enumerate([(480, 640), (480, 640), (427, 640), (640, 480), (720, 1280)]):
        files.append(tmp_path / f"{i}.jpg")
        cv2.imwrite(str(files[-1]), np.full((h, w, 3), 128, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert median_aspect(files + [tmp_path / "broken.jpg", tmp_path / "missing.jpg"]) == pytest.approx(0.75)
    assert median_aspect([tmp_path / "broken.jpg"]) is None and median_aspect([]) is None
