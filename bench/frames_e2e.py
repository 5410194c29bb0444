"""End to end on real video (issue #15): a camera's frames from an agent to the host's recovery.

1. An MPEG-4 video (OpenCV) of the first half of coco128's val images (bench/frames_domain.py's
   val half A), each held ``--hold`` seconds at ``--fps``, letterboxed to one size, with Gaussian
   sensor noise drawn per frame (so the held frames differ and dedup has to work).
2. The real daemon (the tests' in-process daemon, their real Mosquitto on 127.0.0.1) deploys a signed
   package of YOLOv8n-coco (ONNX, 640) and plays the file once as a stream with ``harvest: true``,
   paced at the video's fps (a camera), ``harvest.interval_s`` = ``--interval``.
3. ``prune-pack frames pull --device ... --out DIR`` (the CLI, a separate process) over that broker.
   DIR then feeds bench/frames_domain.py's ``frames`` arm (``--frames-dir``).

    PYTHONPATH=... python bench/frames_e2e.py [--hold 1.5 --fps 10 --interval 0.5]
    -> bench/out/frames_e2e/pulled/ and bench/results/frames_e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from frames_domain import SHARED, val_halves  # the same half A as the recovery benchmark
from harvest import cpu_name, export_onnx, write_video

from prune_pack.agent import detect

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import Broker  # noqa: E402 - the tests' real-Mosquitto helper
from test_mqtt_helpers import DEV, SITE, InProcessDaemon, Watcher, agent_config, keys  # noqa: E402

OUT = REPO / "bench" / "out" / "frames_e2e"


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """``img`` on a ``size`` x ``size`` canvas as the agent feeds its model (``agent.detect.letterbox``)."""
    return detect.letterbox(img, size)[0]


def camera_video(images: list[Path], path: Path, size: int, fps: float, hold: float, noise: float, seed: int = 0) -> dict:
    """One MPEG-4 file: every image held ``hold`` s, with per-frame sensor noise of std ``noise``."""
    rng = np.random.default_rng(seed)
    frames = []
    per = max(1, round(hold * fps))
    for p in images:
        base = letterbox(cv2.imread(str(p)), size).astype(np.float32)
        frames += [np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8) for _ in range(per)]
    write_video(path, frames, fps)
    return {"images": len(images), "frames": len(frames), "frames_per_image": per, "fps": fps, "size": size,
            "noise_std": noise, "bytes": path.stat().st_size, "seconds_of_video": round(len(frames) / fps, 1)}


def run_agent(tmp: Path, broker: Broker, video: Path, onnx: Path, fps: float, interval: float) -> tuple[InProcessDaemon, Watcher, dict]:
    """The daemon with one harvesting stream; returns once the file has played and the pool is written."""
    from prune_pack.agent.writer import write_package

    os.environ["PP_HOST_PW"] = "host-secret"
    cfg = agent_config(tmp, broker)
    cfg["inference"] = {"threads": 2}
    cfg["streams"] = [{"name": "cam", "source": str(video), "fps_limit": fps, "harvest": True, "loop": False}]
    cfg["harvest"] = {"interval_s": interval, "min_free_mb": 0}
    w = Watcher(broker)
    d = InProcessDaemon(cfg)
    w.status("online")
    pkg = write_package(onnx, {"name": "yolov8n-coco", "precision": "fp32", "version": 1}, tmp / "coco-v1.ppk", keys(tmp)[0])
    t0 = time.monotonic()
    r = w.call("deploy", {"path": str(pkg)}, timeout=300)
    assert r["ok"], r
    ended = lambda t, b: t.endswith("/telemetry") and any(  # noqa: E731
        s.get("stream") == "cam" and s.get("state") == "ended" and s.get("in_flight") == 0 for s in b.get("streams", []))
    w.wait_for(ended, timeout=3600)
    hv = d.daemon.harvester
    time.sleep(1.0)  # the last frame's offer follows the stream's end
    assert hv.wait_idle()
    stream = d.daemon.streams.metrics()["streams"]["cam"]
    return d, w, {"agent_s": round(time.monotonic() - t0, 1), "stream": {k: stream.get(k) for k in
                  ("frames_read", "frames_processed", "frames_dropped", "dropped_by_reason")}, "harvest": hv.status()}


def pull_cli(tmp: Path, broker: Broker, out: Path) -> dict:
    """``prune-pack frames pull`` as an operator runs it: a separate process, host credentials."""
    host = tmp / "host.yaml"
    host.write_text(yaml.safe_dump({"device": {"site": SITE}, "mqtt": {"username": "host", "password_env": "PP_HOST_PW"}}))
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).parent / "prune-pack"
    t = time.monotonic()
    p = subprocess.run([str(exe), "frames", "pull", "--device", DEV, "--out", str(out), "--config", str(host),
                        "--broker", broker.url, "--json"], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PP_HOST_PW": "host-secret", "XDG_CONFIG_HOME": str(tmp / "xdg")})
    if p.returncode:
        raise RuntimeError(f"frames pull exited {p.returncode}: {p.stderr[-800:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["cli_s"] = round(time.monotonic() - t, 2)
    res["bytes_jpeg"] = sum(f.stat().st_size for f in out.glob("*.jpg"))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED / "data" / "coco128" / "data.yaml"))
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--hold", type=float, default=1.5, help="seconds each image stays in view")
    ap.add_argument("--interval", type=float, default=0.5, help="harvest.interval_s")
    ap.add_argument("--noise", type=float, default=3.0, help="sensor noise std (grey levels)")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "frames_e2e.json"))
    a = ap.parse_args()
    from prune_pack.pruning.sources import resolve_dataset

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp_s:
        tmp = Path(tmp_s)
        half_a, _ = val_halves(resolve_dataset(a.data, tmp / "data"))
        video = OUT / "camera.mp4"
        res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "args": vars(a),
                     "load_start": os.getloadavg(), "video": camera_video(half_a, video, a.size, a.fps, a.hold, a.noise)}
        onnx = export_onnx(a.size)
        broker = Broker(tmp).start()
        d = w = None
        try:
            d, w, res["agent"] = run_agent(tmp, broker, video, onnx, a.fps, a.interval)
            res["pull"] = pull_cli(tmp, broker, OUT / "pulled")
        finally:
            if d is not None:
                d.stop()
            if w is not None:
                w.close()
            broker.stop()
        # which val image each pulled frame shows: nearest letterboxed original by thumbnail
        from prune_pack.agent.harvest import changed_fraction, descriptor, list_frames

        ref = np.stack([descriptor(letterbox(cv2.imread(str(p)), a.size)) for p in half_a])
        shown = [int(changed_fraction(descriptor(cv2.imread(str(f))), ref).argmin()) for f in list_frames(OUT / "pulled")]
        res["coverage"] = {"distinct_images": len(set(shown)), "frames": len(shown),
                           "missing": [half_a[i].name for i in range(len(half_a)) if i not in set(shown)],
                           "duplicates": len(shown) - len(set(shown))}
        res["load_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("video", "agent", "pull", "coverage")}, indent=1))


if __name__ == "__main__":
    main()
