"""pruning/: coupled-structure equivalence, shapes, checkpoint round trip, bias compensation, errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")
pytest.importorskip("torch_pruning")

from conftest import bus_jpg  # noqa: E402

from prune_pack.errors import UserInputError  # noqa: E402
from prune_pack.pruning import graph as G  # noqa: E402
from prune_pack.pruning import importance as I  # noqa: E402
from prune_pack.pruning import plan as P  # noqa: E402
from prune_pack.pruning.checkpoint import load_checkpoint, save_pruned  # noqa: E402
from prune_pack.pruning.prune import prune_model  # noqa: E402

IMGSZ = 128


def _model(pt: Path) -> torch.nn.Module:
    from ultralytics import YOLO

    return copy.deepcopy(YOLO(str(pt)).model).float().eval()


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Random-init BN is the identity; give it real statistics so that a wrong coupling shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.5
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5


@pytest.fixture(scope="module")
def bus_tensor() -> torch.Tensor:
    return I.load_images([bus_jpg()], IMGSZ)


def test_c2f_split_is_exact(tiny_pt, bus_tensor):
    model = _model(tiny_pt)
    with torch.no_grad():
        ref = model(bus_tensor)[0]
        G.make_prunable(model)
        out = model(bus_tensor)[0]
    assert any(isinstance(m, G.C2fPrunable) for m in model.modules())
    assert not any(type(m).__name__ == "C2f" for m in model.modules())
    assert torch.equal(out, ref)


def test_forced_zero_channels_prune_to_identical_outputs(tiny_pt, bus_tensor):
    """Remove, in every group at once, a channel whose output is forced to zero: outputs must not move."""
    import torch_pruning as tp

    model = G.make_prunable(_model(tiny_pt))
    _randomize_bn(model)
    dg, groups = G.build_groups(model)

    # Every coupled structure of YOLOv8 is represented, with its coupling resolved.
    names = {g.name: g for g in groups}
    assert len(names["model.2.cv1"].producers) == 2  # C2f second half + bottleneck residual add
    assert len(names["model.4.cv1"].producers) == 3  # two chained residual bottlenecks
    sppf = [c for c in names["model.9.cv1"].consumers if c[0] is model.model[9].cv2.conv]
    assert len(sppf[0][1]) == 4 * names["model.9.cv1"].size  # SPPF concat of pooled copies
    concat_fed = [c for c in names["model.6.cv2"].consumers if c[0] is model.model[12].cv0.conv]
    assert concat_fed and min(concat_fed[0][1]) >= model.model[12].cv0.conv.in_channels - names["model.6.cv2"].size  # offset in the PAN concat
    head = model.model[-1]
    detect_inputs = {head.cv2[0][0].conv, head.cv3[0][0].conv}
    assert detect_inputs <= {c[0] for c in names["model.15.cv2"].consumers}  # Detect input coupling
    protected = {id(m) for m in G.protected_layers(model)}
    assert not any(id(p[0]) in protected for g in groups for p in g.producers)

    with torch.no_grad():
        before = model(bus_tensor)[0]
        chosen = {}
        for g in groups:
            k = g.size // 2
            chosen[g.name] = k
            for conv, bn, _, idxs, roots in g.producers:
                j = idxs[roots.index(k)]
                conv.weight[j] = 0
                if conv.bias is not None:
                    conv.bias[j] = 0
                if bn is not None:
                    bn.weight[j] = 0
                    bn.bias[j] = 0
        zeroed = model(bus_tensor)[0]
    assert not torch.allclose(zeroed, before, atol=1e-3)  # the zeroing is not a no-op: the test can fail

    final = [m.out_channels for m in G.protected_layers(model) if isinstance(m, torch.nn.Conv2d)]
    for g in groups:
        dg.get_pruning_group(g.root, tp.prune_conv_out_channels, [chosen[g.name]]).prune()
    with torch.no_grad():
        pruned = model(bus_tensor)[0]
    assert pruned.shape == zeroed.shape
    torch.testing.assert_close(pruned, zeroed, rtol=1e-4, atol=1e-3)
    assert [m.out_channels for m in G.protected_layers(model) if isinstance(m, torch.nn.Conv2d)] == final
    assert all(g.root.out_channels == g.size - 1 for g in groups)


def test_rounding_never_overprunes_small_layers():
    assert P.rounded_keep(16, 0.05, 8, 0.75) == 16  # 5% of the stem must not become 50%
    assert P.rounded_keep(256, 0.2, 8, 0.75) == 208
    assert P.rounded_keep(16, 0.5, 8, 0.75) == 8
    assert P.rounded_keep(64, 0.9, 8, 0.75) == 16  # per-layer maximum ratio
    assert all(k % 8 == 0 for k in P.allowed_keeps(256, 8, 0.75))
    assert P.rounded_keep(30, 0.2, 8, 0.75) in (24, 30)


@pytest.mark.parametrize("allocation,criterion", [("uniform", "l1"), ("global", "bn_scale"), ("sensitivity", "act_var"),
                                                 ("sensitivity", "auto")])
def test_prune_model_shapes_and_info(tiny_pt, bus_tensor, allocation, criterion):
    yolo, info = prune_model(tiny_pt, 0.3, criterion=criterion, imgsz=IMGSZ, allocation=allocation, progress=False,
                             sens_images=2, sens_imgsz=32)
    ref_model = _model(tiny_pt)
    with torch.no_grad():
        out = yolo.model.eval()(bus_tensor)[0]
        ref = ref_model(bus_tensor)[0]
    assert out.shape == ref.shape == (1, 4 + 3, (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2)
    assert info["params_after"] < info["params_before"] and info["gflops_after"] < info["gflops_before"]
    assert 0.15 < info["achieved_ratio"] < 0.45 and info["requested_ratio"] == 0.3
    assert info["criterion"] == ("lsq" if criterion == "auto" else criterion) and len(info["base_sha256"]) == 64
    widths = info["widths"]
    assert sum(o - n for o, n in widths.values()) == info["channels_before"] - info["channels_after"]
    for name, (orig, new) in widths.items():
        assert new >= orig * 0.25  # max_layer_ratio 0.75
        assert new == orig or new % 16 == 0  # round_to default
    head = yolo.model.model[-1]
    assert [s[-1].out_channels for s in head.cv2] == [64] * 3 and [s[-1].out_channels for s in head.cv3] == [3] * 3
    assert "bus.jpg" in info["calibration"]


def test_a_build_prunes_several_ratios_from_one_calibration_and_ranking(tiny_pt):
    kw = dict(imgsz=IMGSZ, progress=False, sens_images=2, sens_imgsz=32, criterion="act_var")
    cache: dict = {}
    _, first = prune_model(tiny_pt, 0.2, calib_cache=cache, **kw)
    kept = {k: id(v) for k, v in cache.items()}
    assert any(isinstance(k, tuple) and k[-1] == "act_var" for k in cache)  # the channel ranking is cached too
    _, cached = prune_model(tiny_pt, 0.3, calib_cache=cache, **kw)
    assert {k: id(v) for k, v in cache.items()} == kept  # nothing recomputed
    _, fresh = prune_model(tiny_pt, 0.3, **kw)
    assert cached["widths"] == fresh["widths"] and cached["achieved_ratio"] > first["achieved_ratio"]


def test_fresh_process_reload_predict_export(tiny_pt, tmp_path):
    yolo, info = prune_model(tiny_pt, 0.25, criterion="l1", imgsz=IMGSZ, allocation="uniform", progress=False)
    out = save_pruned(yolo, tmp_path / "pruned.pt", info)
    code = f"""
import json, sys, numpy as np, onnxruntime as ort, torch
from ultralytics import YOLO
m = YOLO({str(out)!r})
assert m.task == "detect"
r = m.predict({str(bus_jpg())!r}, imgsz={IMGSZ}, verbose=False, conf=0.0, max_det=5)
onnx = m.export(format="onnx", imgsz={IMGSZ}, simplify=False, verbose=False)
ck = torch.load({str(out)!r}, weights_only=False)
x = np.random.default_rng(0).random((1, 3, {IMGSZ}, {IMGSZ}), dtype=np.float32)
y = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]).run(None, {{"images": x}})[0]
t = ck["model"].float().eval()(torch.from_numpy(x))[0].detach().numpy()
print(json.dumps({{"boxes": len(r[0].boxes), "shape": list(y.shape), "maxdiff": float(np.abs(y - t).max()),
                  "scale": float(np.abs(t).max()), "widths": ck["prune_pack"]["widths"],
                  "cls": type(ck["model"].model[2]).__module__ + "." + type(ck["model"].model[2]).__name__}}))
"""
    env = dict(os.environ, YOLO_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["boxes"] == 5
    assert got["shape"] == [1, 7, (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2]
    assert got["maxdiff"] <= 1e-3 * max(1.0, got["scale"])
    assert got["widths"] == info["widths"]
    assert got["cls"] == "prune_pack.pruning.graph.C2fPrunable"
    loaded, prov = load_checkpoint(out)
    assert prov["base_sha256"] == info["base_sha256"] and prov["criterion"] == "l1"


def test_sampled_patches_are_unfold_rows():
    """The least-squares sampler gathers patches in ``unfold``'s layout (all positions taken)."""
    gen = torch.Generator().manual_seed(0)
    for k, s, p, cin, hw in [(3, 1, 1, 5, 9), (3, 2, 1, 4, 10), (1, 1, 0, 6, 7), (3, 2, 1, 3, 11)]:
        conv = torch.nn.Conv2d(cin, 2, k, s, p)
        x = torch.randn(2, cin, hw, hw)
        ref = torch.nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        ref = ref.permute(0, 2, 1).reshape(-1, cin * k * k)
        assert torch.equal(P.sampled_patches(x, conv, 10**6, gen), ref)
        sub = P.sampled_patches(x, conv, 5, gen)  # 5 random positions per image, each a real row
        assert sub.shape == (10, cin * k * k)
        assert all((ref[:len(ref) // 2] == r).all(1).any() for r in sub[:5])


def test_bias_compensation_reduces_output_error(coco_pt, coco128_yaml):
    """Same channels removed with no compensation, mean (bias) compensation and least-squares
    reconstruction: each must cut the output error on real images not used for calibration
    (calibration: coco128 train; evaluation: coco128 val)."""
    from prune_pack.pruning.sources import dataset_images

    base = G.make_prunable(_model(coco_pt))
    x = I.load_images(dataset_images(coco128_yaml, "val", limit=4), 256)
    calib = I.load_images(dataset_images(coco128_yaml, "train", limit=16), 256)
    with torch.no_grad():
        ref = base(x)[0]
    errs = {}
    for mode in ("none", "mean", "lsq"):
        model = copy.deepcopy(base)
        dg, groups = G.build_groups(model)
        ctx = I.CalibContext(model=model, images=calib)
        ctx.in_stats = I.collect_input_stats(model, groups, calib)
        scores = I.group_scores(groups, "act_var", ctx)
        plan = P.uniform_plan(groups, 0.1, 8, 0.75)
        P.apply_plan(model, dg, groups, plan, scores, ctx, compensation=mode)
        with torch.no_grad():
            errs[mode] = P.distortion(model(x)[0], ref, 80)
    assert errs["lsq"] < errs["mean"] < errs["none"], errs


def test_lsq_criterion_removes_one_of_two_twins_first_and_keeps_the_other(coco_pt, coco128_yaml):
    """Make one channel of model.3 an exact copy of its most informative channel (same filter and
    BatchNorm): act_var ranks the pair first (keeps both), while ``lsq`` (the error left after the
    consumers' least-squares refit, one channel at a time) removes one twin first, since the other
    predicts it, and then keeps the other, which nothing predicts any more."""
    from prune_pack.pruning.sources import dataset_images

    model = G.make_prunable(_model(coco_pt))
    dg, groups = G.build_groups(model)
    g = next(g for g in groups if g.name == "model.3")
    calib = I.load_images(dataset_images(coco128_yaml, "train", limit=8), 160)
    ctx = I.CalibContext(model=model, images=calib)
    ctx.in_stats = I.collect_input_stats(model, groups, calib)
    best = int(I.act_var(g, ctx).argmax())
    copy_to = int(I.act_var(g, ctx).argmin())
    conv, bn = g.producers[0][0], g.producers[0][1]
    with torch.no_grad():
        conv.weight[copy_to] = conv.weight[best]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[copy_to] = t[best]
    ctx.in_stats = I.collect_input_stats(model, groups, calib)
    ctx.grams = P.input_grams(model, {c for c, _, _ in g.consumers}, calib)
    av, order = I.act_var(g, ctx), I.lsq_order(g, ctx)
    assert int(av.argmax()) in (best, copy_to)
    first = int(P.lowest(order, 1)[0])
    assert first in (best, copy_to)
    other = copy_to if first == best else best
    assert float(order[other]) > float(order.median())  # once its twin is gone, it carries the information
    with pytest.raises(UserInputError, match="needs compensation 'lsq'"):
        prune_model(coco_pt, 0.1, criterion="lsq", compensation="mean", progress=False)


def test_bn_recalibration_matches_the_calibration_statistics(coco_pt, coco128_yaml):
    """After ``recalibrate_bn`` every BatchNorm's running mean/var are its input's statistics on
    the calibration images (over all of them, whatever the batch), and the model's outputs change."""
    from prune_pack.pruning.sources import dataset_images

    model = _model(coco_pt)
    calib = I.load_images(dataset_images(coco128_yaml, "train", limit=6), 128)
    bn = model.model[2].cv1.bn
    seen: list[torch.Tensor] = []
    h = bn.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
    with torch.no_grad():
        before = model(calib[:2])[0]
    seen.clear()
    assert P.recalibrate_bn(model, calib, batch=4) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    h.remove()
    assert len(seen) == 2 and not model.training and not bn.training and bn.momentum == 0.03  # state restored
    # BatchNorm's cumulative average: per-batch means and unbiased variances, averaged over batches
    m = torch.stack([s.mean((0, 2, 3)) for s in seen]).mean(0)
    assert torch.allclose(bn.running_mean, m, atol=1e-4)
    v = torch.stack([s.var((0, 2, 3), unbiased=True) for s in seen]).mean(0)
    assert torch.allclose(bn.running_var, v, rtol=1e-3, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(model(calib[:2])[0], before)


def test_taylor_and_every_criterion_score_each_channel(coco_pt):
    model = G.make_prunable(_model(coco_pt))
    dg, groups = G.build_groups(model)
    ctx = I.CalibContext(model=model, images=I.load_images([bus_jpg()], 160))
    ctx.in_stats = I.collect_input_stats(model, groups, ctx.images)
    ctx.grads = I.taylor_scores(model, groups, ctx.images)
    assert all(p.grad is None for p in model.parameters())
    # lsq (~20 s on all groups): test_prune_model_shapes_and_info[sensitivity-auto] and the twin test
    for name in ("l1", "l2", "bn_scale", "taylor", "act_var"):
        scores = I.group_scores(groups, name, ctx)
        for g in groups:
            s = scores[g.name]
            assert s.shape == (g.size,) and torch.isfinite(s).all()
        assert sum(float(s.sum()) for s in scores.values()) > 0, name
    # L1 ranks by weight magnitude: the lowest-L1 filter of model.3 is the one chosen first.
    g = next(g for g in groups if g.name == "model.3")
    w = g.producers[0][0].weight.abs().sum((1, 2, 3))
    assert int(P.lowest(I.group_scores([g], "l1", ctx)[g.name], 1)[0]) == int(w.argmin())


def test_bad_inputs_fail_with_one_clear_error(tiny_pt, tmp_path, work_dir):
    with pytest.raises(UserInputError, match="ratio"):
        prune_model(tiny_pt, 1.5, progress=False)
    with pytest.raises(UserInputError, match="ratio"):
        prune_model(tiny_pt, -0.1, progress=False)
    with pytest.raises(UserInputError, match="criterion"):
        prune_model(tiny_pt, 0.1, criterion="magic", progress=False)
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(UserInputError, match="corrupt.pt"):
        load_checkpoint(bad)
    from ultralytics import YOLO

    cls = YOLO("yolov8n-cls.yaml")
    cls_pt = tmp_path / "cls.pt"
    cls.save(cls_pt)
    with pytest.raises(UserInputError, match="detection"):
        prune_model(cls_pt, 0.1, progress=False)
    seg = YOLO("yolov8n-seg.yaml")
    seg_pt = tmp_path / "seg.pt"
    seg.save(seg_pt)
    with pytest.raises(UserInputError, match="detection"):
        load_checkpoint(seg_pt)
    ds = tmp_path / "ds"
    (ds / "images" / "train").mkdir(parents=True)
    (ds / "data.yaml").write_text("path: .\ntrain: images/train\nnames: {0: a}\n")
    with pytest.raises(UserInputError, match="val"):
        prune_model(tiny_pt, 0.1, data_yaml=ds / "data.yaml", progress=False)


def test_prune_calibrates_on_a_read_only_dataset(tiny_pt, tmp_path):
    """A dataset without write bits is mirrored into a temp folder: the calibration images must
    be read before that folder goes away (regression: "no readable calibration images")."""
    import shutil
    import stat

    from ultralytics.utils import ASSETS

    ds = tmp_path / "ro"
    for split in ("train", "val"):
        (ds / "images" / split).mkdir(parents=True)
        (ds / "labels" / split).mkdir(parents=True)
        for img in ("bus.jpg", "zidane.jpg"):
            shutil.copy(ASSETS / img, ds / "images" / split / img)
            (ds / "labels" / split / img.replace(".jpg", ".txt")).write_text("0 0.5 0.5 0.2 0.2\n")
    (ds / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: a, 1: b, 2: c}\n")
    for f in [ds, *ds.rglob("*")]:
        f.chmod(f.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yolo, info = prune_model(tiny_pt, 0.2, data_yaml=ds / "data.yaml", imgsz=64, criterion="act_var", progress=False)
        assert info["calib_images"] == 2 and "train split, 2 images" in info["calibration"]
        assert info["achieved_ratio"] > 0
        assert sorted(p.name for p in ds.rglob("*")) == sorted(["images", "labels", "train", "val", "train", "val", "data.yaml",
                                                                 "bus.jpg", "zidane.jpg", "bus.jpg", "zidane.jpg",
                                                                 "bus.txt", "zidane.txt", "bus.txt", "zidane.txt"])
    finally:
        for f in [ds, *ds.rglob("*")]:
            f.chmod(f.stat().st_mode | stat.S_IWUSR)


def test_cli_prune(tiny_pt, tmp_path):
    exe = Path(sys.executable).parent / "prune-pack"
    if not exe.exists():
        pytest.skip("prune-pack console script not installed in this environment")
    out = tmp_path / "cli.pt"
    res = subprocess.run([str(exe), "prune", "--model", str(tiny_pt), "--ratio", "0.2", "--criterion", "l2", "--allocation", "uniform",
                          "--imgsz", "64", "--compensation", "mean", "--out", str(out), "--json"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["requested_ratio"] == 0.2 and 0 < got["achieved_ratio"] < 0.4 and got["widths"] and out.is_file()
    assert got["bias_compensation"] == "mean" and got["criterion"] == "l2"
    res = subprocess.run([str(exe), "prune", "--model", str(tiny_pt), "--ratio", "1.5", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "ratio" in res.stderr


@pytest.mark.parametrize("cfg", ["yolov8s.yaml", "yolo11n.yaml"])
def test_forced_zero_equivalence_other_families(cfg, bus_tensor):
    """The same machinery on YOLOv8s widths and YOLO11 (C3k2, C2PSA kept whole, depthwise head)."""
    import torch_pruning as tp
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = G.make_prunable(DetectionModel(cfg, nc=3, verbose=False).eval())
    _randomize_bn(model)
    dg, groups = G.build_groups(model)
    assert len(groups) > 20
    with torch.no_grad():
        chosen = {}
        for g in groups:
            chosen[g.name] = k = g.size // 2
            for conv, bn, _, idxs, roots in g.producers:
                j = idxs[roots.index(k)]
                conv.weight[j] = 0
                if bn is not None:
                    bn.weight[j] = 0
                    bn.bias[j] = 0
        zeroed = model(bus_tensor)[0]
    for g in groups:
        dg.get_pruning_group(g.root, tp.prune_conv_out_channels, [chosen[g.name]]).prune()
    with torch.no_grad():
        pruned = model(bus_tensor)[0]
    torch.testing.assert_close(pruned, zeroed, rtol=1e-4, atol=1e-3)


def _frames(folder: Path, n: int) -> Path:
    """A hand-copied frames folder: ``n`` JPEGs (bus.jpg flipped/shifted copies) with JSON sidecars."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    im = cv2.imread(str(bus_jpg()))
    for i in range(n):
        cv2.imwrite(str(folder / f"f{i:03d}.jpg"), __import__("numpy").roll(im[:, ::-1] if i % 2 else im, 17 * i, axis=1))
        (folder / f"f{i:03d}.json").write_text('{"stream": "cam"}')
    return folder


def test_prune_calibrates_on_unlabeled_frames_and_counts_them(tiny_pt, tmp_path):
    frames = _frames(tmp_path / "frames", 5)
    kw = dict(criterion="act_var", compensation="mean", imgsz=64, allocation="uniform", progress=False, recalibrate_bn=True)
    _, info = prune_model(tiny_pt, 0.3, unlabeled=frames, calib_images=4, **kw)
    assert info["frames"] == {"calibration": 4, "bn_recalibration": 4} and info["calib_images"] == 4
    assert "unlabeled frames" in info["calibration"]
    _, plain = prune_model(tiny_pt, 0.3, **kw)  # without frames: the bundled images, nothing counted
    assert plain["frames"] == {"calibration": 0, "bn_recalibration": 0}
    (tmp_path / "sidecars").mkdir()
    (tmp_path / "sidecars" / "f.json").write_text("{}")
    with pytest.raises(UserInputError, match="no images"):
        prune_model(tiny_pt, 0.3, unlabeled=tmp_path / "sidecars", **kw)


def test_cli_prune_flags_over_config_over_defaults(tiny_pt, tmp_path):
    """The prune section of a config file is read (no literal defaults in the handler); a flag beats it."""
    from prune_pack.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("prune:\n  criterion: l2\n  allocation: uniform\n  compensation: mean\n  round_to: 8\n")
    frames = _frames(tmp_path / "frames", 3)
    out = tmp_path / "cli.pt"
    rc = main(["prune", "--model", str(tiny_pt), "--ratio", "0.2", "--imgsz", "64", "--config", str(cfg), "--criterion", "l1",
               "--unlabeled", str(frames), "--out", str(out)])
    assert rc == 0
    prov = load_checkpoint(out)[1]
    assert prov["criterion"] == "l1"  # the flag
    assert prov["allocation"] == "uniform" and prov["bias_compensation"] == "mean" and prov["round_to"] == 8  # the config
    assert prov["frames"]["calibration"] == 3 and prov["max_layer_ratio"] == 0.75  # the frames; a default
