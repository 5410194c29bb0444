"""Fine-tuning pruned models through Ultralytics' real trainer: widths survive, FP32 checkpoints,
class transfer, distillation, validation of .pt and .onnx, and one-line errors for bad input.

Everything runs the real trainer/validator on 8 coco128 images at imgsz 160 (a few seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("ultralytics")

import torch  # noqa: E402
import yaml  # noqa: E402

from prune_pack.errors import UserInputError  # noqa: E402
from prune_pack.pruning import finetune as F  # noqa: E402
from prune_pack.pruning import recover as R  # noqa: E402
from tests.conftest import shared_path  # noqa: E402

IMGSZ = 160


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys\nfrom prune_pack.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def ft_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft")


@pytest.fixture(scope="module")
def tiny_data(ft_dir) -> Path:
    """8 coco128 val images (train = val) with their labels, in a writable temp folder."""
    src = shared_path("data", "coco128")
    root = ft_dir / "tiny"
    images = sorted((src / "images" / "val2017").glob("*.jpg"))[:8]
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for im in images:
            shutil.copy(im, root / "images" / split / im.name)
            lb = src / "labels" / "val2017" / f"{im.stem}.txt"
            if lb.exists():
                shutil.copy(lb, root / "labels" / split / lb.name)
    names = yaml.safe_load((src / "data.yaml").read_text())["names"]
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": names}))
    return root / "data.yaml"


@pytest.fixture(scope="module")
def pruned_pt(ft_dir, coco_pt) -> Path:
    """yolov8n pruned by 30 % with the project's own pruner (non-standard widths, C2fPrunable blocks)."""
    from prune_pack.pruning.checkpoint import save_pruned
    from prune_pack.pruning.prune import prune_model

    yolo, info = prune_model(coco_pt, 0.3, criterion="l1", imgsz=IMGSZ, allocation="uniform", progress=False)
    return save_pruned(yolo, ft_dir / "pruned.pt", info)


@pytest.fixture(scope="module")
def finetuned(ft_dir, pruned_pt, tiny_data) -> tuple[Path, dict]:
    out = ft_dir / "ft.pt"
    res = F.finetune(pruned_pt, tiny_data, epochs=1, imgsz=IMGSZ, out=out, batch=8, progress=False)
    return out, res


def test_one_epoch_keeps_pruned_widths(pruned_pt, finetuned, coco_pt):
    from ultralytics.nn.tasks import DetectionModel

    out, res = finetuned
    src, _ = F.load_detection_checkpoint(pruned_pt)
    got, ckpt = F.load_detection_checkpoint(out)
    widths = F.layer_widths(src)
    # The trap this guards against is real: the model's yaml rebuilds different (unpruned) widths.
    assert F.layer_widths(DetectionModel(src.yaml, nc=src.model[-1].nc, verbose=False)) != widths
    assert F.layer_widths(got) == widths
    assert type(got.model[2]).__name__ == type(src.model[2]).__name__ == "C2fPrunable"
    # It trained (weights moved) and says so.
    moved = [k for k, v in got.state_dict().items() if v.is_floating_point() and not torch.equal(v.float(), src.state_dict()[k].float())]
    assert moved
    assert res["epochs"] == 1 and res["widths_kept"] and not res["distill"]
    assert 0.0 <= res["after"]["map50_95"] <= res["after"]["map50"] <= 1.0
    assert set(res["after"]["per_class"]) <= set(src.names.values())


def test_checkpoint_is_fp32_keeps_provenance_and_reloads_in_fresh_process(pruned_pt, finetuned, tiny_data):
    out, _ = finetuned
    raw = torch.load(out, map_location="cpu", weights_only=False)
    assert {p.dtype for p in raw["model"].parameters()} == {torch.float32}
    assert raw["prune_pack"] == torch.load(pruned_pt, map_location="cpu", weights_only=False)["prune_pack"]
    rec = raw["finetune"]
    assert rec["epochs"] == 1 and rec["lr"] == 0.002 and rec["teacher_sha256"] is None
    assert rec["data"] == str(Path(tiny_data).resolve())
    code = (
        "import sys, torch\n"
        "from ultralytics import YOLO\n"
        "from prune_pack.pruning.finetune import layer_widths\n"
        f"y = YOLO({str(out)!r})\n"
        "assert {p.dtype for p in y.model.parameters()} == {torch.float32}\n"
        f"r = y.predict({str(sorted((Path(tiny_data).parent / 'images' / 'val').glob('*.jpg'))[0])!r}, imgsz={IMGSZ}, verbose=False)\n"
        "print(len(layer_widths(y.model)), sum(layer_widths(y.model).values()), r[0].boxes.data.shape[1])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "YOLO_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    widths = F.layer_widths(F.load_detection_checkpoint(pruned_pt)[0])
    assert p.stdout.split()[-3:] == [str(len(widths)), str(sum(widths.values())), "6"]


def test_adapt_classes_remaps_matching_names_and_keeps_box_branch(coco_pt):
    model, _ = F.load_detection_checkpoint(coco_pt)
    head = model.model[-1]
    old_cls = [s[-1].weight.detach().clone() for s in head.cv3]
    old_box = [s[-1].weight.detach().clone() for s in head.cv2]
    coco = model.names
    assert F.adapt_classes(model, {0: "Dog", 1: "part"})  # 'dog' is a COCO class, 'part' is not
    assert head.nc == 2 and model.names == {0: "Dog", 1: "part"} and head.no == 2 + 4 * head.reg_max
    dog = [k for k, v in coco.items() if v == "dog"][0]
    for i, s in enumerate(head.cv3):
        assert s[-1].out_channels == 2
        assert torch.equal(s[-1].weight[0], old_cls[i][dog])
        assert not torch.equal(s[-1].weight[1], old_cls[i][0])
        assert torch.equal(head.cv2[i][-1].weight, old_box[i])
    y = model.eval()(torch.zeros(1, 3, IMGSZ, IMGSZ))[0]
    assert y.shape[1] == 4 + 2
    assert not F.adapt_classes(model, {0: "Dog", 1: "part"})  # idempotent


def test_class_transfer_to_bccd(ft_dir, pruned_pt):
    data = shared_path("data", "bccd", "data.yaml")  # read-only: labels cache cannot be written there
    out = ft_dir / "bccd.pt"
    res = F.finetune(pruned_pt, data, epochs=1, imgsz=IMGSZ, out=out, batch=8, progress=False,
                     fraction=0.05, measure=False)
    assert res["classes_adapted"]
    model, ckpt = F.load_detection_checkpoint(out)
    src, _ = F.load_detection_checkpoint(pruned_pt)
    head = model.model[-1]
    assert head.nc == 3 and model.names == {0: "Platelets", 1: "RBC", 2: "WBC"}
    assert [s[-1].out_channels for s in head.cv3] == [3, 3, 3]
    class_convs = F._head_class_convs(model)
    w_src, w_got = F.layer_widths(src), F.layer_widths(model)
    assert {k: v for k, v in w_got.items() if k not in class_convs} == {k: v for k, v in w_src.items() if k not in class_convs}
    assert model.eval()(torch.zeros(1, 3, IMGSZ, IMGSZ))[0].shape[1] == 4 + 3
    assert set(res["after"]["per_class"]) <= {"Platelets", "RBC", "WBC"}
    assert ckpt["finetune"]["classes"] == {0: "Platelets", 1: "RBC", 2: "WBC"}


def test_distillation_from_unpruned_teacher(ft_dir, pruned_pt, tiny_data, coco_pt):
    out = ft_dir / "kd.pt"
    res = F.finetune(pruned_pt, tiny_data, epochs=1, imgsz=IMGSZ, out=out, batch=8, progress=False,
                     teacher=coco_pt, measure=False)
    assert res["distill"]
    assert res["losses"].get("dis_loss", 0.0) > 0.0  # the teacher really contributed a loss term
    raw = torch.load(out, map_location="cpu", weights_only=False)
    assert type(raw["model"]).__name__ == "DetectionModel"  # the student alone: no teacher, no projector
    assert not any("projector" in k or "teacher" in k for k in raw["model"].state_dict())
    assert F.layer_widths(raw["model"]) == F.layer_widths(F.load_detection_checkpoint(pruned_pt)[0])
    from prune_pack.pruning.sources import sha256_file

    assert raw["finetune"]["teacher_sha256"] == sha256_file(coco_pt)


def test_validate_pt_and_onnx_agree(ft_dir, finetuned, tiny_data):
    from ultralytics import YOLO

    out, _ = finetuned
    m_pt = F.validate(out, tiny_data, imgsz=IMGSZ)
    onnx = Path(YOLO(str(out)).export(format="onnx", imgsz=IMGSZ, simplify=False, verbose=False))
    m_onnx = F.validate(onnx, tiny_data, imgsz=IMGSZ)
    assert set(m_pt) >= {"map50_95", "map50", "per_class"}
    assert abs(m_pt["map50_95"] - m_onnx["map50_95"]) < 0.01
    assert set(m_onnx["per_class"]) == set(m_pt["per_class"])


def test_validate_int8_onnx(tiny_data):
    onnx = shared_path("models", "yolov8n_int8.onnx")
    m = F.validate(onnx, tiny_data, imgsz=640)
    names = set(yaml.safe_load(Path(tiny_data).read_text())["names"].values())
    assert 0.0 < m["map50_95"] <= m["map50"] <= 1.0
    assert m["per_class"] and set(m["per_class"]) <= names


def test_corrupt_checkpoint_is_one_error(tmp_path, coco_pt, tiny_data):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(Path(coco_pt).read_bytes()[:100_000])  # truncated download
    with pytest.raises(UserInputError, match="bad.pt"):
        F.load_detection_checkpoint(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "out.pt"
    p = _run_cli("finetune", "--model", str(junk), "--data", str(tiny_data), "--epochs", "1", "--imgsz", str(IMGSZ),
                 "--out", str(out), cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "junk.pt" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not out.exists()


def test_dataset_without_val_split(tmp_path, pruned_pt, tiny_data):
    data = tmp_path / "noval.yaml"
    data.write_text(yaml.safe_dump({"path": str(Path(tiny_data).parent), "train": "images/train", "names": {0: "a"}}))
    out = tmp_path / "out.pt"
    with pytest.raises(UserInputError, match="no 'val' split"):
        F.finetune(pruned_pt, data, epochs=1, imgsz=IMGSZ, out=out, progress=False)
    with pytest.raises(UserInputError, match="no 'val' split"):
        F.validate(pruned_pt, data, imgsz=IMGSZ)
    assert not out.exists()


def test_cli_finetune_and_val_json(tmp_path, pruned_pt, tiny_data):
    out = tmp_path / "cli.pt"
    p = _run_cli("finetune", "--model", str(pruned_pt), "--data", str(tiny_data), "--epochs", "1", "--imgsz", str(IMGSZ),
                 "--method", "labels", "--batch", "8", "--lr0", "0.001", "--out", str(out), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["out"] == str(out) and res["epochs"] == 1 and "map50_95" in res["after"]
    assert torch.load(out, map_location="cpu", weights_only=False)["finetune"]["lr"] == 0.001
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cli.pt"]  # no ./runs in the user's cwd
    p = _run_cli("val", "--model", str(out), "--data", str(tiny_data), "--imgsz", str(IMGSZ), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    assert m["map50_95"] == pytest.approx(F.validate(out, tiny_data, imgsz=IMGSZ)["map50_95"], abs=1e-4)
    assert isinstance(m["per_class"], dict)


# ----------------------------------------------------------------------------- distillation recovery


def _kd_loss(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    from prune_pack.pruning.distill import _raw, distill_loss

    with torch.no_grad():
        return float(sum(distill_loss(_raw(student.eval(), x), _raw(teacher.eval(), x))))


def test_distill_moves_the_pruned_model_towards_its_teacher(ft_dir, pruned_pt, tiny_data, coco_pt):
    """The recorded base model is the default teacher; the loss to it on held-out images falls;
    widths, provenance and the FP32 checkpoint format survive."""
    from prune_pack.pruning import importance as I
    from prune_pack.pruning.distill import distill
    from prune_pack.pruning.sources import sha256_file

    val = sorted(shared_path("data", "coco128", "images", "train2017").glob("*.jpg"))[-4:]  # not in tiny_data
    x = I.load_images(val, IMGSZ)
    teacher = F.load_detection_checkpoint(coco_pt)[0]
    before = _kd_loss(F.load_detection_checkpoint(pruned_pt)[0], teacher, x)
    out = ft_dir / "distilled.pt"
    res = distill(pruned_pt, tiny_data, out, imgsz=IMGSZ, iterations=30, batch=4, lr=1e-3, measure=False, progress=False)
    assert res["teacher"] == str(coco_pt) and res["iterations"] == 30 and res["widths_kept"]
    model, ckpt = F.load_detection_checkpoint(out)
    after = _kd_loss(model, teacher, x)
    assert after < 0.9 * before, (before, after)
    assert F.layer_widths(model) == F.layer_widths(F.load_detection_checkpoint(pruned_pt)[0])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    rec = ckpt["finetune"]
    assert rec["method"] == "distill" and rec["teacher_sha256"] == sha256_file(coco_pt)
    assert rec["train_images"] == 8  # the tiny_data fixture's train split
    assert ckpt["prune_pack"]["provenance"]["base_sha256"] == sha256_file(coco_pt)


def test_distill_refuses_other_classes_and_auto_picks_labels_for_them(ft_dir, pruned_pt, tmp_path, tiny_data):
    from prune_pack.pruning.distill import distill

    other = tmp_path / "other.yaml"
    cfg = yaml.safe_load(tiny_data.read_text())
    other.write_text(yaml.safe_dump({**cfg, "path": str(tiny_data.parent), "names": {0: "part", 1: "scratch"}}))
    with pytest.raises(UserInputError, match="classes"):
        distill(pruned_pt, other, tmp_path / "x.pt", imgsz=IMGSZ, iterations=1, measure=False, progress=False)
    assert R.choose_method("auto", pruned_pt, other) == "labels"
    assert R.choose_method("auto", pruned_pt, tiny_data) == "distill"
    assert R.choose_method("labels", pruned_pt, tiny_data) == "labels"
    with pytest.raises(UserInputError, match="epochs"):
        distill(pruned_pt, tiny_data, tmp_path / "x.pt", imgsz=IMGSZ, measure=False, progress=False)
    assert not (tmp_path / "x.pt").exists()


def test_cli_finetune_auto_distills(tmp_path, pruned_pt, tiny_data):
    out = tmp_path / "kd.pt"
    p = _run_cli("finetune", "--model", str(pruned_pt), "--data", str(tiny_data), "--epochs", "1", "--imgsz", str(IMGSZ),
                 "--batch", "4", "--out", str(out), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["method"] == "distill" and res["iterations"] == 2  # 1 epoch of 8 images at batch 4
    assert "map50_95" in res["after"] and out.is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["kd.pt"]


def test_feature_hints_tap_only_layers_whose_shape_pruning_kept(coco_pt):
    import copy

    from prune_pack.pruning.distill import FeatureTaps
    from prune_pack.pruning.prune import prune_model

    # 5 % uniform: the rounding keeps the small layers whole, so some layers keep their shape
    student = prune_model(coco_pt, 0.05, criterion="l1", imgsz=IMGSZ, allocation="uniform", progress=False)[0].model.eval()
    teacher = F.load_detection_checkpoint(coco_pt)[0].eval()
    x = torch.rand(1, 3, 96, 96)
    same = FeatureTaps(copy.deepcopy(teacher), teacher, 64)
    assert same.layers == list(range(2, len(teacher.model) - 1))  # every layer after the stem, Detect excluded
    same.remove()
    copy_model = copy.deepcopy(teacher)
    taps = FeatureTaps(student, teacher, 64)
    assert taps.layers and set(taps.layers) < set(same.layers)  # the pruned widths are not tapped
    with torch.no_grad():
        student(x)
        teacher(x)
    assert float(taps.loss()) > 0 and not taps.out  # consumed
    taps.remove()
    twin = FeatureTaps(copy_model, teacher, 64)
    with torch.no_grad():
        copy_model(x)
        teacher(x)
    assert float(twin.loss()) == 0.0
    twin.remove()
    with torch.no_grad():
        student(x)
    assert not taps.out and not twin.out  # removed hooks record nothing


# ----------------------------------------------------------------------------- unlabeled frames, train device


@pytest.fixture(scope="module")
def frames_dir(ft_dir) -> Path:
    """A hand-copied harvest: coco128 train images (not the tiny split's), JSON sidecars, a hidden partial file."""
    src = sorted((shared_path("data", "coco128") / "images" / "train2017").glob("*.jpg"))[-6:]
    root = ft_dir / "frames"
    (root / "cam1").mkdir(parents=True)
    for i, im in enumerate(src):
        dest = root / ("cam1" if i % 2 else "") / im.name
        shutil.copy(im, dest)
        dest.with_suffix(".json").write_text(json.dumps({"stream": "cam1", "why": "novel"}))
    (root / ".partial.jpg").write_bytes(b"\xff\xd8 cut short")
    return root


def test_unlabeled_images_ignores_sidecars_and_samples_evenly(frames_dir, tmp_path):
    from prune_pack.pruning.sources import unlabeled_images

    got = unlabeled_images(frames_dir)
    assert len(got) == 6 and all(p.suffix == ".jpg" and not p.name.startswith(".") for p in got)
    assert got == sorted(got)
    few = unlabeled_images(frames_dir, limit=3)
    assert len(few) == 3 and few[0] == got[0] and few[-1] != got[2]  # spread over the folder, not its first files
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.json").write_text("{}")
    with pytest.raises(UserInputError, match="no images"):
        unlabeled_images(tmp_path / "empty")
    with pytest.raises(UserInputError, match="not a folder"):
        unlabeled_images(tmp_path / "missing")


def test_distill_on_unlabeled_frames_counts_them(tmp_path, pruned_pt, tiny_data, frames_dir):
    out = tmp_path / "kd-frames.pt"
    res = R.recover(pruned_pt, tiny_data, out, method="distill", imgsz=IMGSZ, epochs=1, batch=4, workers=1,
                    train_device="cpu", unlabeled=frames_dir, measure=False, progress=False)
    # Frames change what is seen, not how long: 1 epoch of the 8 train images at batch 4 = 2 iterations.
    assert res["iterations"] == 2 and res["frames"] == {"distillation": 6} and res["train_device"] == "cpu"
    rec = torch.load(out, map_location="cpu", weights_only=False)["finetune"]
    assert rec["unlabeled_frames"] == 6 and rec["unlabeled"] == str(frames_dir.resolve()) and rec["train_device"] == "cpu"


def test_distill_batches_do_not_depend_on_loader_workers(pruned_pt, frames_dir):
    from prune_pack.pruning.distill import _batches
    from prune_pack.pruning.sources import unlabeled_images

    paths = unlabeled_images(frames_dir)
    a = list(_batches(paths, 2, 64, seed=3, workers=0, device=torch.device("cpu"), steps=2))
    b = list(_batches(paths, 2, 64, seed=3, workers=2, device=torch.device("cpu"), steps=2))
    assert len(a) == len(b) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_train_device_resolution_and_cuda_without_cuda_is_one_line(tmp_path, pruned_pt, tiny_data):
    assert R.resolve_train_device("cpu") == "cpu"
    with pytest.raises(UserInputError, match="expected auto, cpu, cuda"):
        R.resolve_train_device("tpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert R.resolve_train_device("auto") == R.resolve_train_device(None) == "cpu"
    p = _run_cli("finetune", "--model", str(pruned_pt), "--data", str(tiny_data), "--imgsz", str(IMGSZ), "--epochs", "1",
                 "--train-device", "cuda", "--out", str(tmp_path / "x.pt"), cwd=tmp_path)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--train-device cuda" in lines[0] and "0 CUDA device" in lines[0], p.stderr[-2000:]
    assert not (tmp_path / "x.pt").exists()


def test_cli_finetune_flag_beats_config_beats_default(tmp_path, pruned_pt, tiny_data):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("finetune:\n  train_device: cuda:7\n  method: distill\n  batch: 4\n")
    p = _run_cli("finetune", "--model", str(pruned_pt), "--data", str(tiny_data), "--imgsz", str(IMGSZ), "--epochs", "1",
                 "--config", str(cfg), "--out", str(tmp_path / "x.pt"), cwd=tmp_path)
    assert p.returncode == 2 and "--train-device cuda:7" in p.stderr  # the config's device, no flag given
    p = _run_cli("finetune", "--model", str(pruned_pt), "--data", str(tiny_data), "--imgsz", str(IMGSZ), "--epochs", "1",
                 "--config", str(cfg), "--train-device", "cpu", "--workers", "0", "--out", str(tmp_path / "y.pt"), "--json",
                 cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["train_device"] == "cpu" and res["method"] == "distill" and res["batch"] == 4  # flag, then config
