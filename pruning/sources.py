"""Offline-safe resolution of models and datasets given by the user.

prune-pack never downloads: Ultralytics would fetch ``yolov8n.pt`` or ``coco8.yaml`` by
name, which hangs or fails on an offline industrial network and leaves half-written files.
A name that is not a local file is refused up front with what to pass instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import yaml

import prune_pack.offline  # noqa: F401 - first: Ultralytics must never reach the network
from prune_pack.agent.harvest import IMAGE_EXTS, list_frames  # the one reader of a frames folder
from prune_pack.agent.package import sha256_file  # noqa: F401 - re-exported for host modules
from prune_pack.errors import OfflineError, UserInputError


def resolve_model(model: str | Path) -> Path:
    """A local .pt path, or a clear error (never a download)."""
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix not in (".pt", ".pth"):
            raise UserInputError(f"--model {model}: expected an Ultralytics .pt checkpoint, got '{p.suffix or 'no suffix'}'")
        return p.resolve()
    if p.parent == Path(".") and p.suffix in (".pt", ".yaml", ".yml", "") and not p.exists():
        raise OfflineError(
            f"model '{model}' is not a local file; prune-pack never downloads weights (this machine may be offline). "
            "Pass the path of a local .pt file (e.g. --model /path/to/yolov8n.pt), or leave --model out to use the built-in demo model"
        )
    raise UserInputError(f"model file not found: {model}")


def resolve_dataset(data: str | Path, workdir: str | Path) -> Path:
    """Validate a dataset yaml and write a copy with an absolute ``path`` into ``workdir``.

    Ultralytics resolves a relative ``path`` against its own datasets folder, not against the
    yaml; we resolve it against the yaml's folder, which is what every user expects.
    """
    p = Path(data).expanduser()
    if not p.is_file():
        if p.parent == Path(".") and p.suffix in (".yaml", ".yml", ""):
            raise OfflineError(
                f"dataset '{data}' is not a local file; prune-pack never downloads datasets (this machine may be offline). "
                "Pass the path of a local dataset yaml (Ultralytics format), or leave --data out to use the built-in demo dataset"
            )
        raise UserInputError(f"dataset yaml not found: {data}")
    try:
        cfg: Any = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserInputError(f"dataset yaml {data} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise UserInputError(f"dataset yaml {data}: expected a mapping with train/val/names")
    root = Path(cfg.get("path") or ".")
    if not root.is_absolute():
        root = (p.parent / root).resolve()
    if not root.is_dir():
        raise UserInputError(f"dataset yaml {data}: path '{cfg.get('path')}' -> {root} is not a folder")
    for split in ("train", "val"):
        if not cfg.get(split):
            raise UserInputError(f"dataset yaml {data}: no '{split}' split (detection needs train and val)")
        entries = cfg[split] if isinstance(cfg[split], list) else [cfg[split]]
        for entry in entries:
            sp = Path(entry) if Path(entry).is_absolute() else root / entry
            if not sp.exists():
                raise UserInputError(f"dataset yaml {data}: {split} folder '{entry}' -> {sp} does not exist")
    names = cfg.get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise UserInputError(f"dataset yaml {data}: 'names' (class names) is missing or empty")
    cfg["names"] = {int(k): str(v) for k, v in names.items()}
    cfg["nc"] = len(cfg["names"])
    out_dir = Path(workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Stable name per source so that repeated runs reuse the same file.
    tag = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]
    if _read_only(root):
        root = _mirror(root, cfg, out_dir / f"{p.stem}-{tag}-mirror")
    cfg["path"] = str(root)
    out = out_dir / f"{p.stem}-{tag}.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    os.replace(tmp, out)
    return out


def _read_only(root: Path) -> bool:
    """No write bit on the dataset folder: a mounted or shipped copy we must not touch.

    Checked on the mode, not with os.access: root passes os.access and would litter the
    dataset with Ultralytics' label caches."""
    return not (root.stat().st_mode & 0o222)


def _mirror(root: Path, cfg: dict, dest: Path) -> Path:
    """A writable mirror of a read-only dataset: per-file image symlinks, copied label files.

    Ultralytics writes ``labels/<split>.cache`` beside the labels it reads and resolves
    directory paths, so only a real folder of per-file links keeps the cache out of ``root``.
    """
    import shutil

    for split in ("train", "val", "test"):
        entries = cfg.get(split)
        for entry in entries if isinstance(entries, list) else [entries] if entries else []:
            src = root / entry
            if Path(entry).is_absolute() or not src.is_dir() or "images" not in Path(entry).parts:
                continue  # absolute paths and .txt lists are used as given
            parts = list(Path(entry).parts)
            i = len(parts) - 1 - parts[::-1].index("images")
            lbl = Path(*parts[:i], "labels", *parts[i + 1:])
            for img in src.rglob("*"):
                if img.is_file():
                    link = dest / entry / img.relative_to(src)
                    if not link.exists():
                        link.parent.mkdir(parents=True, exist_ok=True)
                        link.symlink_to(img)
            if (root / lbl).is_dir():
                for txt in (root / lbl).rglob("*.txt"):
                    copy = dest / lbl / txt.relative_to(root / lbl)
                    if not copy.exists():
                        copy.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(txt, copy)
    return dest


def dataset_images(data_yaml: str | Path, split: str = "val", limit: int | None = None) -> list[Path]:
    """Image files of a resolved dataset's split, sorted (deterministic calibration sets)."""
    cfg = yaml.safe_load(Path(data_yaml).read_text(encoding="utf-8"))
    root = Path(cfg["path"])
    entries = cfg[split] if isinstance(cfg[split], list) else [cfg[split]]
    exts = IMAGE_EXTS
    files: list[Path] = []
    for entry in entries:
        sp = Path(entry) if Path(entry).is_absolute() else root / entry
        if sp.is_dir():
            files += sorted(f for f in sp.rglob("*") if f.suffix.lower() in exts)
        elif sp.suffix == ".txt":
            files += [Path(line.strip()) if Path(line.strip()).is_absolute() else root / line.strip()
                      for line in sp.read_text().splitlines() if line.strip()]
    return files[:limit] if limit else files


def median_aspect(images: Sequence[str | Path], sample: int = 1000) -> Optional[float]:
    """Median height / width of the images (at most ``sample`` of them, evenly spread); None if none
    is readable. Reads headers only: seconds for thousands of files."""
    from PIL import Image

    images = list(images)
    step = max(1, len(images) // sample)
    ratios: list[float] = []
    for p in images[::step]:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - unreadable files are the trainer's problem, not the shape's (with
            continue  # Ultralytics imported, PIL's open of a broken file can even raise ModuleNotFoundError for pi_heif)
        if w > 0 and h > 0:
            ratios.append(h / w)
    return float(np.median(ratios)) if ratios else None


def unlabeled_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The images of a folder of unlabeled frames (harvested by the agent or copied by hand), sorted.

    Subfolders are searched too (a harvest keeps one per stream); anything that is not an image
    (the harvester's JSON sidecars, partial downloads, hidden files) is ignored. ``limit`` takes an
    evenly spread sample, not the first files: those would all be one stream's first minutes.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserInputError(f"--unlabeled {folder}: not a folder of images")
    files = list_frames(root)
    if not files:
        raise UserInputError(f"--unlabeled {folder}: no images (JPEG/PNG) in it")
    if limit and len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files
