"""``prune-pack build`` end to end with the real pruner, exporter, trainer and profiler on a tiny
model (imgsz 224, a dozen synthetic images): interrupted + resumed, already-met and unreachable
targets, and remote mode against a real agent over a real Mosquitto on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from prune_pack.errors import DeviceUnavailable

pytest.importorskip("torch")
pytest.importorskip("ultralytics")

IMGSZ = 224


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-class YOLOv8n (random init) + a small deterministic demo-style dataset."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from prune_pack.deploy.demo import CLASSES, ensure_demo_dataset

    root = tmp_path_factory.mktemp("tinybuild")
    data = ensure_demo_dataset(root / "data", n_train=12, n_val=6)
    torch.manual_seed(0)
    y = YOLO("yolov8n.yaml")
    y.model = DetectionModel("yolov8n.yaml", nc=len(CLASSES), verbose=False)
    y.model.names = dict(enumerate(CLASSES))
    pt = root / "tiny4.pt"
    y.save(pt)
    return pt, data


def _config(path: Path, **extra) -> Path:
    # The sensitivity probe and the lsq ranking (~20 s for YOLOv8n widths) are the pruner's slow parts; the
    # criteria and the ranking cache have their own tests (test_pruning.py).
    cfg = {"prune": {"allocation": "uniform", "criterion": "act_var"},
           "profile": {"runs": 60, "warmup": 3}, "finetune": {"batch": 4, "workers": 0},
           # A shared CI machine is noisy: room for repeats. fp32 on ORT: these tests are about pruning
           # (the precision levers are tested in test_build_search).
           "build": {"max_measurements": 12, "precision": "fp32", "backend": "ort"}}
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp: Path) -> dict:
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp / "cfghome"), YOLO_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _cli(args: list[str], tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prune_pack.cli", "build", *args], capture_output=True, text=True,
                          env=_env(tmp), timeout=timeout)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _p50_interleaved(paths: list[Path], rounds: int = 5) -> list[float]:
    from prune_pack.agent.profiler import profile_model

    vals: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, p in enumerate(paths):
            # ~3 ms per run at this size: 100 runs keep one slow stretch of the machine from setting the target
            vals[i].append(profile_model(str(p), threads=2, warmup=5, runs=100)["p50_ms"])
    return [sorted(v)[len(v) // 2] for v in vals]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_interrupted_build_resumes_and_meets_a_target_between_pruned_and_unpruned(tiny, tmp_path):
    from prune_pack.agent.verifier import verify_package
    from prune_pack.deploy.export import export_onnx
    from prune_pack.pruning.checkpoint import save_pruned
    from prune_pack.pruning.prune import prune_model

    pt, data = tiny
    # The target: between the unpruned and a strongly pruned model, measured here, interleaved.
    yolo, _ = prune_model(pt, 0.6, data_yaml=data, imgsz=IMGSZ, allocation="uniform", criterion="act_var", progress=False)
    pruned = save_pruned(yolo, tmp_path / "p60.pt", {})
    onnx_u = export_onnx(pt, tmp_path / "u.onnx", imgsz=IMGSZ)
    onnx_p = export_onnx(pruned, tmp_path / "p.onnx", imgsz=IMGSZ)
    lu, lp = _p50_interleaved([onnx_u, onnx_p])
    assert lp < lu, f"pruning 60 % of the channels did not make it faster ({lp:.1f} vs {lu:.1f} ms)"
    # A relative target halfway between the unpruned and the 60 %-pruned model: reachable below the
    # 0.6 ratio, and never met by the unpruned model (it is a fraction of that model's own latency),
    # so the build always reaches pruning, where it is interrupted, on a fast or a slow host alike.
    frac = min(0.95, round((lp + 0.5 * (lu - lp)) / lu, 3))

    cfg = _config(tmp_path / "c.yaml")
    out = tmp_path / "out"
    # Frames of the deployment scene, as a device's harvest would bring them (a copy of the train images
    # with sidecars): the build calibrates and recovers on them and the report counts them (issue 15).
    frames = tmp_path / "frames" / "cam1"
    frames.mkdir(parents=True)
    for img in sorted((data.parent / yaml.safe_load(data.read_text())["path"] / "images" / "train").glob("*"))[:8]:
        (frames / img.name).write_bytes(img.read_bytes())
        (frames / (img.stem + ".json")).write_text('{"stream": "cam1"}')
    args = ["--model", str(pt), "--data", str(data), "--target-ms", f"{frac}x", "--percentile", "p50",
            "--imgsz", str(IMGSZ), "--epochs", "1", "--config", str(cfg), "--out", str(out), "--json",
            "--unlabeled", str(frames.parent)]
    # 1) interrupted (SIGINT, as Ctrl-C) when the build starts pruning: the test hook names the phase,
    # so the interruption does not depend on how fast this host is.
    p = subprocess.run([sys.executable, "-m", "prune_pack.cli", "build", *args], capture_output=True, text=True,
                       env=dict(_env(tmp_path), PRUNE_PACK_STOP_AT_PHASE="prune"), timeout=300)
    lines = p.stderr.splitlines(keepends=True)
    tail = p.stderr[-3000:]
    if p.returncode == 5 and "too noisy" in p.stderr:
        # The relative target is a fraction of the baseline: a machine whose repeated measurements
        # of it disagree (other work on the cores) ends undecided, by design; nothing to resume then.
        assert not out.exists() or not any(out.iterdir()), tail
        pytest.skip("this machine was too busy to measure a steady baseline: " + tail.strip().splitlines()[-1][-300:])
    assert p.returncode == 130, tail
    assert (out / ".work" / "state.json").is_file()
    # What was saved before the interruption: the baseline, measured twice.
    saved = {k: len(v) for k, v in json.loads((out / ".work" / "state.json").read_text())["search"]["measurements"].items()}
    assert saved and all(k.endswith("r0.000") for k in saved), saved
    assert not list(out.glob("*.ppk")) and not (out / "report.json").exists()  # nothing half-written

    # 2) resume: the measured candidates are reused, the build completes
    r = _cli(args + ["--resume"], tmp_path)
    new_measured = [ln.split()[2].rstrip(":") for ln in r.stderr.splitlines() if ln.startswith("build: measured")]
    # Reused, not re-measured: the baseline is not measured again; no candidate more than 1 + 1 repeat times.
    assert not set(saved) & set(new_measured), (saved, new_measured)
    for k in set(new_measured):
        assert new_measured.count(k) <= 2, (k, new_measured)
    if r.returncode == 5 and ("too noisy" in r.stderr or "edge of the noise" in r.stderr or "budget" in r.stderr):
        # Lenient on a loaded machine: the noise ate the measurement budget. Then the refusal must be
        # clean (nothing half-written, no state left to resume from a decided failure).
        assert not out.exists() or not any(out.iterdir()), r.stderr[-2000:]
        pytest.skip("the machine was too noisy for this target (load changed between measurements): "
                    + r.stderr.strip().splitlines()[-1][-300:])
    assert r.returncode == 0, r.stderr[-3000:]
    res = _last_json(r.stdout)
    for key in ("target_ms", "percentile", "achieved_ms", "measurements", "ratio", "map50_95_before",
                "map50_95_after", "package", "backend", "precision", "imgsz"):
        assert key in res
    # achieved_ms pools all verification samples; a pass decided by one measurement's interval may
    # leave that pooled point a little above the target, never far.
    target = res["target_ms"]
    assert res["achieved_ms"] <= target * 1.05 and res["percentile"] == "p50"
    assert res["measurements"] <= 12
    report = json.loads((out / "report.json").read_text())
    counts = {c["key"]: len(c["measurements"]) for c in report["candidates"] if not c.get("same_as")}
    for k in saved:  # the measurements saved before the interruption are reused in the final report
        assert counts[k] == saved[k] + new_measured.count(k)
    assert target == pytest.approx(frac * report["baseline_ms"], rel=1e-3) and res["target"] == f"{frac:g}x"
    assert res["ratio"] > 0  # a relative target below 1 is never met by the unpruned model
    # no needless pruning: no measured candidate with less pruning also met the target
    passed = [c["ratio"] for c in report["candidates"] if c["decision"] == "pass"]
    assert min(passed) == report["chosen"]["ratio"] or report["verification"]["steps"] == 1
    assert report["verification"]["records"][-1]["decision"] == "pass"
    assert {"prune", "export", "profile", "finetune", "package"} <= set(report["phases_s"]) or res["ratio"] == 0
    assert report["accuracy_before"]["per_class"] is not None
    assert res["frames"]["folder"] == str(frames.parent)
    assert report["frames"]["distillation"] > 0 and report["frames"]["pruning_calibration"] > 0
    shipped = [c for c in report["lever_costs"] if c["key"] == report["verification"]["records"][-1]["key"]]
    assert len(shipped) == 1 and shipped[0]["gate"] is True  # each candidate once; the shipped one as packaged
    assert (out / "report.md").is_file() and (out / "latency.png").stat().st_size > 1000
    assert not (out / ".work").exists()
    pub = tmp_path / "cfghome" / "prune-pack" / "signing.pub"  # the default key, created on first use
    assert pub.is_file() and "created your signing key" in "".join(lines)
    vp = verify_package(res["package"], trusted_keys=[pub])
    assert vp.manifest["imgsz"] == IMGSZ
    vp.discard()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_target_already_met_still_exports_packages_and_reports(tiny, tmp_path):
    pt, data = tiny
    out = tmp_path / "out"
    # The target comes from the config (build.target_ms), no --target-ms: the config is read (issue 14).
    r = _cli(["--model", str(pt), "--data", str(data), "--imgsz", str(IMGSZ),
              "--config", str(_config(tmp_path / "c.yaml", build={"target_ms": "100000"})), "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # Without --json, stdout is the summary alone (the exporter's output goes to stderr, and only with --verbose)
    assert r.stdout.startswith("p95 ") and "profile it: prune-pack profile" in r.stdout, r.stdout[-2000:]
    assert "ONNX" not in r.stdout and "Ultralytics" not in r.stdout
    res = json.loads((out / "report.json").read_text())
    assert res["target_ms"] == 100000 and res["chosen"]["ratio"] == 0 and res["lever"] == "none"
    assert res["verification"]["steps"] == 0
    # the unpruned model twice (is the machine steady? three times when the two disagree), then the package
    assert res["measurements"] in (3, 4)
    report = res
    assert "finetune" not in report["phases_s"] and "prune" not in report["phases_s"]
    assert Path(res["package"]).is_file() and (out / "report.md").is_file()
    assert "Device (the shipped package's verification): backend=ort, precision=fp32" in (out / "report.md").read_text()
    assert "build: pruning" not in r.stderr
    from prune_pack.agent.package import read_manifest

    # the target travels with the package: the agent reports it (model.target_ms) for dashboards and alerts
    assert read_manifest(res["package"])["target"] == {"latency_ms": 100000.0, "percentile": "p95"}


def _squashed_copy(data: Path, dst: Path, aspect: float) -> Path:
    """The dataset with every image resized to height = aspect x width (normalised labels are unchanged)."""
    import cv2

    from prune_pack.pruning.sources import dataset_images, resolve_dataset

    src = resolve_dataset(data, dst / "resolved")
    for split in ("train", "val"):
        for img in dataset_images(src, split):
            rel = Path("images") / split / img.name
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            im = cv2.imread(str(img))
            cv2.imwrite(str(dst / rel), cv2.resize(im, (im.shape[1], round(im.shape[1] * aspect))))
            lab = dst / "labels" / split / (img.stem + ".txt")
            lab.parent.mkdir(parents=True, exist_ok=True)
            lab.write_text((img.parent.parent.parent / "labels" / split / (img.stem + ".txt")).read_text())
    cfg = yaml.safe_load(Path(data).read_text())
    cfg.update(path=str(dst), train="images/train", val="images/val")
    (dst / "data.yaml").write_text(yaml.safe_dump(cfg))
    return dst / "data.yaml"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_4_3_dataset_adds_its_rectangular_input_to_the_levers(tiny, tmp_path):
    pt, data = tiny
    rect = _squashed_copy(data, tmp_path / "rect", 0.75)
    cfg = _config(tmp_path / "c.yaml", build={"precision": "auto", "backend": "ort"})
    out = tmp_path / "out"
    r = _cli(["--model", str(pt), "--data", str(rect), "--target-ms", "100000", "--imgsz", str(IMGSZ),
              "--config", str(cfg), "--out", str(out), "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # 224 wide, 0.75 x 224 = 168 rounded up to the stride: 224x192 (w x h), for FP32 and for INT8
    assert "0.75 as high as wide (median): also trying the input 224x192" in r.stderr
    levers = next(line for line in r.stderr.splitlines() if "levers " in line)
    assert "ort-fp32-224x192-r0.000, ort-int8-224-r0.000, ort-int8-224x192-r0.000" in levers
    assert _last_json(r.stdout)["imgsz"] == IMGSZ  # the unpruned square model met the target: nothing else measured

    square = _cli(["--model", str(pt), "--data", str(data), "--target-ms", "100000", "--imgsz", str(IMGSZ),
                   "--config", str(cfg), "--out", str(tmp_path / "out2"), "--json"], tmp_path)
    assert square.returncode == 0 and "also trying the input" not in square.stderr and "x192" not in square.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unreachable_target_fails_clearly_and_leaves_the_folder_as_it_was(tiny, tmp_path):
    pt, data = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _cli(["--model", str(pt), "--data", str(data), "--target-ms", "0.01", "--imgsz", str(IMGSZ),
              "--config", str(_config(tmp_path / "c.yaml")), "--out", str(out), "--json"], tmp_path)
    assert r.returncode == 5, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("prune-pack: error: target 0.01 ms at p95 not reachable") and "best" in err and "INT8" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    fresh = tmp_path / "fresh"
    r = _cli(["--model", str(pt), "--data", str(data), "--target-ms", "0.01", "--imgsz", str(IMGSZ),
              "--config", str(_config(tmp_path / "c.yaml")), "--out", str(fresh)], tmp_path)
    assert r.returncode == 5 and not fresh.exists()


# ---------------------------------------------------------------- remote mode


def _daemon_or_skip():
    try:
        from prune_pack.agent.daemon import Daemon  # noqa: F401
    except ImportError as e:  # the daemon lands separately
        pytest.skip(f"prune_pack.agent.daemon is not importable yet ({e})")


@pytest.fixture
def remote(broker, tmp_path, monkeypatch):
    """A real agent (in this process, its loop in a thread) connected to the broker fixture, trusting
    a key made for the test; yields (host config path, device id, signing key)."""
    _daemon_or_skip()
    from prune_pack.agent.daemon import Daemon
    from prune_pack.agent.keys import generate_keypair
    from prune_pack.config import parse_config

    # One key signs the packages (--sign) and the profile commands (deploy.remote, through
    # $PRUNE_PACK_COMMAND_KEY); the device trusts it for both roles.
    key, pub = generate_keypair(tmp_path / "keys")
    monkeypatch.setenv("PRUNE_PACK_COMMAND_KEY", str(key))
    (tmp_path / "device.pw").write_text("device-secret\n")
    (tmp_path / "host.pw").write_text("host-secret\n")
    dev_cfg = {
        "device": {"id": "cell-7", "site": "lab"},
        "mqtt": {"broker": broker.url, "username": "device", "password_file": str(tmp_path / "device.pw"),
                 "reconnect_min_s": 1.0, "reconnect_max_s": 2.0, "keepalive_s": 5},
        "agent": {"state_dir": str(tmp_path / "state"), "telemetry_interval_s": 1.0, "trusted_keys": [str(pub)],
                  "command_keys": [str(pub)]},
        "profile": {"runs": 20, "warmup": 2},
    }
    d = Daemon.from_config(parse_config(yaml.safe_dump(dev_cfg)))
    d.start()
    t = threading.Thread(target=d.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    host = _config(tmp_path / "host.yaml", device={"site": "lab"},
                   mqtt={"username": "host", "password_file": str(tmp_path / "host.pw")},
                   build={"profile_timeout_s": 60.0, "precision": "auto", "backend": "auto"})  # the defaults
    try:
        yield host, "cell-7", key
    finally:
        d.request_stop()
        t.join(15)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_remote_device_profiles_candidates_over_mqtt(tiny, remote, broker, tmp_path):
    pt, data = tiny
    host, dev, key = remote
    out = tmp_path / "out"
    r = _cli(["--model", str(pt), "--data", str(data), "--target-ms", "100000", "--imgsz", str(IMGSZ),
              "--config", str(host), "--device", dev, "--broker", broker.url, "--sign", str(key),
              "--out", str(out), "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = _last_json(r.stdout)
    report = json.loads((out / "report.json").read_text())
    # the unpruned model twice (three times when the two disagree), then the shipped package
    assert report["device"] == dev and res["measurements"] in (3, 4)
    m = report["candidates"][0]["measurements"][0]
    assert m["runs"] == 60 and m["threads"] == 2  # the build's settings, measured by the agent
    # backend auto on a remote device: this host's OpenVINO says nothing about the device's
    assert "assuming ONNX Runtime only" in r.stderr and res["backend"] == "ort" and res["precision"] == "fp32"
    assert not (tmp_path / "cfghome" / "prune-pack" / "signing.key").exists()  # --sign: no default key made


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_remote_device_that_does_not_answer_is_a_clear_error(tiny, broker, tmp_path):
    _daemon_or_skip()
    pt, data = tiny
    (tmp_path / "host.pw").write_text("host-secret\n")
    host = _config(tmp_path / "host.yaml", mqtt={"username": "host", "password_file": str(tmp_path / "host.pw")})
    out = tmp_path / "out"
    r = _cli(["--model", str(pt), "--data", str(data), "--target-ms", "50", "--imgsz", str(IMGSZ),
              "--config", str(host), "--device", "ghost-1", "--broker", broker.url, "--out", str(out)], tmp_path)
    assert r.returncode == DeviceUnavailable.exit_code, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("prune-pack: error: device default/ghost-1") and "never reported" in last
    assert not list(out.glob("*.ppk")) and not (out / "report.json").exists()
