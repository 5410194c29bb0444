"""Harvesting (agent.harvest): the measurements behind its thresholds, and what it costs a stream.

``--measure``: (1) near-duplicate descriptor: the share of 32x32 thumbnail cells that changed,
between frames of real encoded video (MPEG-4 written by OpenCV): a static scene with sensor noise
(must read as duplicate), the same scene with a person-sized object moved (must not), a panning
camera and different coco128 scenes; (2) uncertainty score: for YOLOv8n (ONNX, the agent's own
Detector) on coco128, the Spearman correlation of candidate per-image scores with the per-image
error (false + missed boxes at IoU 0.5 over max(1, labelled boxes)).

Default: throughput of one stream (StreamManager, a 640x480 MPEG-4 file read as fast as the
workers take it, ``policy: block`` so no frame is dropped) with harvesting off and on, interleaved
in one run, each rep a fresh StreamManager; the ratio of processed frames per second is the cost.

    PYTHONPATH=... python bench/harvest.py --measure
    PYTHONPATH=... python bench/harvest.py --seconds 20 --reps 3 [--interval 1.0]

Outputs: bench/out/harvest/*.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "harvest"
SHARED = REPO.parent.parent / "shared" if (REPO.parent.parent / "shared").exists() else REPO.parent / "shared"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        f = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
        return f"{f.get('Model name')} family {f.get('CPU family')} model {f.get('Model')}, {f.get('CPU(s)')} CPUs"
    except OSError:
        return platform.processor()


def bus() -> np.ndarray:
    import ultralytics

    img = cv2.imread(str(Path(ultralytics.__file__).parent / "assets" / "bus.jpg"))
    return cv2.resize(img, (900, 1200))


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        vw.write(f)
    vw.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            return out
        out.append(img)


def scene_videos(tmp: Path, n: int = 50) -> dict[str, list[np.ndarray]]:
    """Decoded frames of: a static camera with sensor noise, the same with a person-sized box
    walking through, and a panning camera (bus.jpg), each 640x480 MPEG-4."""
    rng = np.random.default_rng(0)
    base = bus()[300:780, 130:770].copy()
    static = [np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]
    walker = []
    for i in range(n):
        f = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        x = 40 + 11 * i  # a 40x90 px "person" crossing the frame
        cv2.rectangle(f, (x, 300), (x + 40, 390), (60, 50, 40), -1)
        walker.append(f)
    big = bus()
    pan = [big[300 + i % 200: 780 + i % 200, int(130 + 120 * np.sin(i / 20)): int(130 + 120 * np.sin(i / 20)) + 640].copy()
           for i in range(n)]
    return {k: read_video(write_video(tmp / f"{k}.mp4", v)) for k, v in
            (("static", static), ("walker", walker), ("pan", pan))}


def measure_dedup(tmp: Path) -> dict[str, Any]:
    from prune_pack.agent.harvest import changed_fraction, descriptor

    vids = scene_videos(tmp)
    res: dict[str, Any] = {}
    for name, frames in vids.items():
        d = [descriptor(f) for f in frames]
        fr = [float(changed_fraction(d[i], d[0][None])[0]) for i in range(1, len(d))]
        res[name] = {"vs_first_min": round(min(fr), 4), "vs_first_median": round(statistics.median(fr), 4),
                     "vs_first_max": round(max(fr), 4)}
        if name == "walker":  # the box moved by >= its width (4 frames): what must count as new
            moved = [float(changed_fraction(d[i], d[i - 4][None])[0]) for i in range(4, len(d))]
            res[name]["moved_own_width_min"] = round(min(moved), 4)
            res[name]["moved_own_width_median"] = round(statistics.median(moved), 4)
    imgs = sorted((SHARED / "data" / "coco128" / "images").rglob("*.jpg"))[:64]
    if imgs:
        d = np.stack([descriptor(cv2.imread(str(p))) for p in imgs])
        fr = [float(changed_fraction(d[i], np.delete(d, i, 0)).min()) for i in range(len(d))]
        res["coco128_nearest_other"] = {"min": round(min(fr), 4), "median": round(statistics.median(fr), 4)}
    return res


def export_onnx(imgsz: int = 640) -> Path:
    """yolov8n-coco.pt from ../shared exported once to bench/out/harvest/ (a copy: shared is read-only)."""
    OUT.mkdir(parents=True, exist_ok=True)
    onnx = OUT / "yolov8n-coco.onnx"
    if onnx.exists():
        return onnx
    pt = OUT / "yolov8n-coco.pt"
    shutil.copy(SHARED / "models" / "yolov8n-coco.pt", pt)
    from ultralytics import YOLO

    YOLO(str(pt)).export(format="onnx", imgsz=imgsz, simplify=False)
    return onnx


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def _errors(det: np.ndarray, gt: np.ndarray) -> int:
    """False + missed boxes at IoU 0.5, same class, greedy by confidence."""
    if not len(det) or not len(gt):
        return len(det) + len(gt)
    iou = _iou(det[:, :4], gt[:, 1:5])
    used, tp = set(), 0
    for i in np.argsort(-det[:, 4]):
        cand = [j for j in np.argsort(-iou[i]) if iou[i, j] >= 0.5 and j not in used and gt[j, 0] == det[i, 5]]
        if cand:
            used.add(cand[0])
            tp += 1
    return (len(det) - tp) + (len(gt) - tp)


def _spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    return round(float(np.corrcoef(ra, rb)[0, 1]), 3)


def measure_uncertainty(conf: float = 0.25) -> dict[str, Any]:
    from prune_pack.agent.backends import load_session
    from prune_pack.agent.detect import Detector

    det = Detector(load_session(export_onnx(), threads=2))
    errs: list[float] = []
    scores: dict[str, list[float]] = {"n_below_0.4": [], "n_below_0.5": [], "n_below_0.6": [], "1-mean_conf": [],
                                      "1-min_conf": [], "n_detections": []}
    for p in sorted((SHARED / "data" / "coco128" / "images").rglob("*.jpg")):
        img = cv2.imread(str(p))
        h, w = img.shape[:2]
        lab = p.parent.parent.parent / "labels" / p.parent.name / (p.stem + ".txt")
        rows = np.loadtxt(lab, ndmin=2) if lab.exists() and lab.stat().st_size else np.zeros((0, 5))
        gt = np.zeros((len(rows), 5))
        if len(rows):
            gt[:, 0] = rows[:, 0]
            gt[:, 1], gt[:, 3] = (rows[:, 1] - rows[:, 3] / 2) * w, (rows[:, 1] + rows[:, 3] / 2) * w
            gt[:, 2], gt[:, 4] = (rows[:, 2] - rows[:, 4] / 2) * h, (rows[:, 2] + rows[:, 4] / 2) * h
        d, _ = det.detect_array(img, conf)
        errs.append(_errors(d, gt) / max(1, len(gt)))
        c = d[:, 4] if len(d) else np.zeros(0)
        for t in (0.4, 0.5, 0.6):
            scores[f"n_below_{t}"].append(float((c < t).sum()))
        scores["1-mean_conf"].append(float(1 - c.mean()) if len(c) else 0.0)
        scores["1-min_conf"].append(float(1 - c.min()) if len(c) else 0.0)
        scores["n_detections"].append(float(len(c)))
    res: dict[str, Any] = {"images": len(errs), "conf": conf, "spearman_vs_error": {}}
    for k, v in scores.items():
        res["spearman_vs_error"][k] = _spearman(v, errs)
    s = np.array(scores["n_below_0.5"])
    e = np.array(errs)
    res["mean_error_if_n_below_0.5>0"] = round(float(e[s > 0].mean()), 3) if (s > 0).any() else None
    res["mean_error_if_n_below_0.5==0"] = round(float(e[s == 0].mean()), 3) if (s == 0).any() else None
    return res


def stream_video(path: Path, seconds: float = 8.0, fps: float = 25.0) -> Path:
    """640x480 MPEG-4: bus.jpg panning behind a moving box (as bench/streams.py)."""
    if path.exists():
        return path
    big = bus()
    frames = []
    for i in range(int(seconds * fps)):
        x = int(130 + 120 * np.sin(i / 20))
        img = big[300 + i % 200: 780 + i % 200, x: x + 640].copy()
        cv2.rectangle(img, (20 + 3 * i % 500, 40), (120 + 3 * i % 500, 140), (30, 160, 240), -1)
        frames.append(img)
    return write_video(path, frames, fps)


def _instrument(hv: Any) -> dict:
    """Time spent in offer() (worker threads) and CPU of the writer's _store (its own thread)."""
    acc = {"offer_s": 0.0, "offers": 0, "store_cpu_s": 0.0, "stores": 0}
    offer, store = hv.offer, hv._store  # noqa: SLF001 - measuring, not changing

    def timed_offer(*a: Any, **k: Any) -> str:
        t = time.thread_time()
        try:
            return offer(*a, **k)
        finally:
            acc["offer_s"] += time.thread_time() - t
            acc["offers"] += 1

    def timed_store(*a: Any, **k: Any) -> None:
        t = time.thread_time()
        try:
            store(*a, **k)
        finally:
            acc["store_cpu_s"] += time.thread_time() - t
            acc["stores"] += 1

    hv.offer, hv._store = timed_offer, timed_store
    return acc


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_stream(model: Path, video: Path, seconds: float, harvest: bool, interval: float, pool: Path) -> dict:
    from prune_pack.agent.harvest import Harvester
    from prune_pack.agent.settings import HarvestSection, InferenceSection, StreamSection
    from prune_pack.agent.streams import StreamManager, session_factory_for

    inf = InferenceSection()
    s = StreamSection(name="cam", source=str(video), fps_limit=0, policy="block", queue=2, harvest=harvest)
    hv, acc = None, None
    if harvest:
        shutil.rmtree(pool, ignore_errors=True)
        hv = Harvester(HarvestSection(interval_s=interval, min_free_mb=0), pool)
        hv.start()
        acc = _instrument(hv)
    sm = StreamManager([s], inf, session_factory_for(inf, 1), model_path=model, harvester=hv)
    sm.start()
    time.sleep(2.0)  # warm-up: model load, first frames
    m0, c0, t0 = sm.metrics()["streams"]["cam"]["frames_processed"], _cpu(), time.monotonic()
    if acc:
        a0 = dict(acc)
    time.sleep(seconds)
    m1, c1, dt = sm.metrics()["streams"]["cam"]["frames_processed"], _cpu(), time.monotonic() - t0
    sm.stop()
    out = {"harvest": harvest, "fps": round((m1 - m0) / dt, 2), "frames_per_cpu_s": round((m1 - m0) / (c1 - c0), 3),
           "cpu_s": round(c1 - c0, 2)}
    if hv is not None and acc is not None:
        hv.wait_idle()
        hv.stop()
        spent = (acc["offer_s"] - a0["offer_s"]) + (acc["store_cpu_s"] - a0["store_cpu_s"])
        out.update(harvest_cpu_s=round(spent, 4), harvest_cpu_share=round(spent / (c1 - c0), 5),
                   offer_us=round(1e6 * acc["offer_s"] / max(1, acc["offers"]), 1),
                   store_ms=round(1e3 * acc["store_cpu_s"] / max(1, acc["stores"]), 2), pool=hv.status())
    return out


def measure_pull(frames: int, kbps: float, telemetry_s: float = 0.5) -> dict:
    """A pull of ``frames`` real 640x480 JPEGs from an in-process agent over a real Mosquitto
    (the tests' broker and daemon helpers): throughput, and the gaps between telemetry messages
    during the pull as they arrive at a host subscriber (must stay near ``telemetry_s``: the pull must not starve telemetry)."""
    sys.path.insert(0, str(REPO / "tests"))
    import os as _os

    from conftest import Broker  # noqa: E402 - the tests' real-Mosquitto helper
    from test_mqtt_helpers import DEV, SITE, InProcessDaemon, Watcher, agent_config

    from prune_pack.agent.harvest import Harvester
    from prune_pack.agent.settings import HarvestSection, MqttSection
    from prune_pack.deploy.frames import pull
    from prune_pack.deploy.remote import RemoteDevice

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        h = Harvester(HarvestSection(interval_s=0, min_free_mb=0), t / "state" / "harvest")
        h.start()
        for i, img in enumerate(read_video(stream_video(OUT / "stream.mp4"))[:frames]):
            h.offer("cam", img, 1.7e9 + i, np.zeros((0, 6), np.float32))
            h.wait_idle()
        h.stop()
        broker = Broker(t).start()
        _os.environ["PP_HOST_PW"] = "host-secret"
        cfg = agent_config(t, broker)
        cfg["agent"]["telemetry_interval_s"] = telemetry_s
        cfg["harvest"] = {"min_free_mb": 0, "pull_kbps": kbps}
        w = Watcher(broker)
        arrivals: list[float] = []
        orig = w.client.on_message

        def on_message(c: Any, u: Any, msg: Any) -> None:  # arrival time, not the message's own ts_ms
            if msg.topic.endswith("/telemetry"):
                arrivals.append(time.monotonic())
            orig(c, u, msg)

        w.client.on_message = on_message
        d = InProcessDaemon(cfg)
        try:
            w.status("online")
            t0 = time.monotonic()
            res = pull(lambda: RemoteDevice(MqttSection(broker=broker.url, username="host", password_env="PP_HOST_PW"),
                                            DEV, SITE), t / "out", log=lambda m: None)
            dt = time.monotonic() - t0
            tel = [a for a in arrivals if t0 <= a <= t0 + dt]
        finally:
            d.stop()
            w.close()
            broker.stop()
    gaps = np.diff(tel) if len(tel) > 1 else np.zeros(0)
    return {"frames": res["fetched"], "mb": res["mb"], "seconds": round(dt, 2), "mb_per_s": round(res["mb"] / dt, 3),
            "pull_kbps": kbps, "telemetry_interval_s": telemetry_s, "telemetry_messages": len(tel),
            "telemetry_gap_max_s": round(float(gaps.max()), 2) if gaps.size else None,
            "telemetry_gap_median_s": round(float(np.median(gaps)), 2) if gaps.size else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure", action="store_true", help="descriptor and uncertainty measurements")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--interval", type=float, default=1.0, help="harvest.interval_s for the 'on' runs")
    ap.add_argument("--pull", type=int, metavar="N", help="measure a frames pull of N frames over a real Mosquitto")
    ap.add_argument("--kbps", type=float, default=1024.0, help="harvest.pull_kbps for --pull")
    ap.add_argument("--results", default=None, help="also write the throughput JSON here (e.g. bench/results/harvest_throughput.json)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.pull:
        res = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **measure_pull(args.pull, args.kbps)}
        (OUT / "pull.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    if args.measure:
        with tempfile.TemporaryDirectory() as tmp:
            res = {"dedup": measure_dedup(Path(tmp)), "uncertainty": measure_uncertainty(), "cpu": cpu_name()}
        (OUT / "measure.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    model = export_onnx()
    video = stream_video(OUT / "stream.mp4")
    load_start = os.getloadavg()
    runs = []
    for r in range(args.reps):
        for on in ((False, True) if r % 2 == 0 else (True, False)):  # ABBA: a load that drifts cancels out
            res = run_stream(model, video, args.seconds, on, args.interval, OUT / "pool")
            print(json.dumps({"rep": r, **res}), file=sys.stderr)
            runs.append(res)
    med = lambda key, on: statistics.median(x[key] for x in runs if x["harvest"] == on)  # noqa: E731
    share = statistics.median(x["harvest_cpu_share"] for x in runs if x["harvest"])
    pairs = [(runs[2 * r], runs[2 * r + 1]) for r in range(args.reps)]
    ratios = {key: [round((a if a["harvest"] else b)[key] / (b if a["harvest"] else a)[key], 4) for a, b in pairs]
              for key in ("fps", "frames_per_cpu_s")}
    pair_ratio, pair_cpu = statistics.median(ratios["fps"]), statistics.median(ratios["frames_per_cpu_s"])
    res = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "seconds": args.seconds, "reps": args.reps,
           "interval_s": args.interval, "fps_ratio": round(med("fps", True) / med("fps", False), 4),
           "frames_per_cpu_s_ratio": round(med("frames_per_cpu_s", True) / med("frames_per_cpu_s", False), 4),
           "fps_ratio_paired": round(pair_ratio, 4), "frames_per_cpu_s_ratio_paired": round(pair_cpu, 4), "harvest_cpu_share": share,
           "paired_ratios": ratios, "paired_ratio_range": {k: [min(v), max(v)] for k, v in ratios.items()},
           "load_start": load_start, "load_end": os.getloadavg(), "runs": runs}
    (OUT / "throughput.json").write_text(json.dumps(res, indent=1))
    if args.results:
        Path(args.results).write_text(json.dumps(res, indent=1))
    print(f"| harvest | processed fps | frames per CPU-second |\n|---|---|---|\n"
          f"| off | {med('fps', False):.2f} | {med('frames_per_cpu_s', False):.3f} |\n"
          f"| on (interval {args.interval:g} s) | {med('fps', True):.2f} | {med('frames_per_cpu_s', True):.3f} |\n"
          f"| on/off | {res['fps_ratio']:.3f} | {res['frames_per_cpu_s_ratio']:.3f} |\n\n"
          f"median of the {args.reps} paired on/off ratios: fps {pair_ratio:.3f} (range {min(ratios['fps']):.3f}–{max(ratios['fps']):.3f}), "
          f"frames per CPU-second {pair_cpu:.3f} (range {min(ratios['frames_per_cpu_s']):.3f}–{max(ratios['frames_per_cpu_s']):.3f}); "
          f"harvest's own CPU (offer + writer) / process CPU: {100 * share:.2f} % (median of {args.reps})")


if __name__ == "__main__":
    main()
