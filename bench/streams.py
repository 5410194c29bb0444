"""Multi-stream inference benchmark: the agent's StreamManager vs a bare single-threaded loop.

For each model (unpruned and pruned YOLOv8n) and 1, 2, 4 streams of 640x480 25 fps video, runs,
interleaved and each in a fresh subprocess (clean CPU and RSS accounting):

- ``bare``: one loop that reads (decodes) the streams round-robin, letterboxes, infers and runs
  NMS, with one session using all cores: the ceiling for this backend on this machine.
- ``agent``: ``StreamManager`` as the daemon runs it: files paced at 25 fps, latest-frame
  queue, default workers x threads, metrics polled every second, detections published through
  paho-mqtt to a local Mosquitto (2 Hz per stream) when one is installed.
- ``agent-same``: the same, unpaced, with ``policy: block`` (nothing dropped) and bare's layout
  (1 worker x all cores): the pure cost of threads, queues and metrics on exactly the same frames.

It also runs the workers x threads layouts behind ``plan_parallelism``'s default.

    /work/venv-host/bin/python bench/streams.py [--base A.onnx --pruned B.onnx] [--seconds 6] [--reps 2]

Without --base/--pruned it prunes (50 %, l1, uniform) and exports the COCO YOLOv8n from
../shared into bench/out/streams/. Results: bench/out/streams/results.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "streams"
PY = sys.executable


# ---------------------------------------------------------------- inputs


def make_video(path: Path, seconds: float = 8.0, fps: float = 25.0) -> Path:
    """640x480 MPEG-4 at 25 fps: bus.jpg panning behind a moving box (real detections, real decoding)."""
    import cv2
    import numpy as np
    import ultralytics

    if path.exists():
        return path
    bus = cv2.imread(str(Path(ultralytics.__file__).parent / "assets" / "bus.jpg"))
    bus = cv2.resize(bus, (900, 1200))
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
    for i in range(int(seconds * fps)):
        x = int(130 + 120 * np.sin(i / 20))
        img = bus[300 + i % 200: 780 + i % 200, x: x + 640].copy()
        cv2.rectangle(img, (20 + 3 * i % 500, 40), (120 + 3 * i % 500, 140), (30, 160, 240), -1)
        vw.write(img)
    vw.release()
    return path


def make_models() -> tuple[Path, Path]:
    """Unpruned and 50 %-pruned COCO YOLOv8n at 640, exported to ONNX (cached in bench/out)."""
    base, pruned = OUT / "yolov8n_640.onnx", OUT / "yolov8n_pruned50_640.onnx"
    if base.exists() and pruned.exists():
        return base, pruned
    src = REPO.parent / "shared" / "models" / "yolov8n-coco.pt"
    work = OUT / "work"
    work.mkdir(parents=True, exist_ok=True)
    pt = work / "yolov8n-coco.pt"
    shutil.copy(src, pt)  # export writes beside its input; ../shared is read-only
    env = dict(os.environ, YOLO_OFFLINE="1")
    subprocess.run([str(Path(PY).parent / "prune-pack"), "prune", "--model", str(pt), "--ratio", "0.5", "--criterion", "l1",
                    "--allocation", "uniform", "--out", str(work / "pruned50.pt")], check=True, env=env)
    from prune_pack.deploy.export import export_onnx

    export_onnx(pt, base, imgsz=640)
    export_onnx(work / "pruned50.pt", pruned, imgsz=640)
    return base, pruned


class Mosquitto:
    """A throwaway anonymous broker on 127.0.0.1 (the publish path is part of the agent's cost)."""

    def __init__(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = None
        if not Path(exe).exists():
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
        conf = self.dir / "m.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(5)


# ---------------------------------------------------------------- one measurement (subprocess)


def _proc_stats(t0: float, c0: float) -> dict[str, float]:
    import psutil

    t = os.times()
    return {"cpu_percent": round(100 * (t.user + t.system - c0) / (time.monotonic() - t0), 1),
            "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}


def run_bare(model: str, n: int, video: str, seconds: float, threads: int) -> dict[str, Any]:
    import cv2

    from prune_pack.agent.backends import load_session
    from prune_pack.agent.detect import Detector

    det = Detector(load_session(model, threads=threads), conf=0.25, iou=0.7)
    caps = [cv2.VideoCapture(video) for _ in range(n)]

    def read(i: int):
        ok, img = caps[i].read()
        if not ok:  # loop the file, as the agent does
            caps[i].release()
            caps[i] = cv2.VideoCapture(video)
            ok, img = caps[i].read()
        return img

    for i in range(5):
        det.detect_array(read(i % n))
    t0, c0 = time.monotonic(), sum(os.times()[:2])
    frames = 0
    while time.monotonic() - t0 < seconds:
        det.detect_array(read(frames % n))
        frames += 1
    el = time.monotonic() - t0
    return {"fps": round(frames / el, 2), "frames": frames, **_proc_stats(t0, c0)}


def run_agent(model: str, n: int, video: str, seconds: float, block: bool, workers: int, threads: int,
              mqtt_port: int | None) -> dict[str, Any]:
    from prune_pack.agent.settings import InferenceSection, StreamSection
    from prune_pack.agent.streams import StreamManager, session_factory_for

    inf = InferenceSection(workers=workers, threads=threads)
    streams = [StreamSection(name=f"s{i}", source=video, loop=True, publish_detections=mqtt_port is not None,
                             detections_rate_hz=2.0, fps_limit=0 if block else None,
                             policy="block" if block else "latest", queue=1) for i in range(n)]
    client = None
    on_det = None
    if mqtt_port is not None:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")
        client.connect("127.0.0.1", mqtt_port)
        client.loop_start()

        def on_det(stream: str, payload: dict) -> None:
            client.publish(f"prunepack/bench/dev/detections/{stream}", json.dumps(payload), qos=0)

    m = StreamManager(streams, inf, session_factory_for(inf, n), on_detections=on_det, model_path=Path(model))
    m.start()
    time.sleep(2.0)  # warm-up: model, decoders, queues
    a = m.metrics()
    t0, c0 = time.monotonic(), sum(os.times()[:2])
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        m.metrics()  # the daemon's telemetry poll
    b = m.metrics()
    el = time.monotonic() - t0
    stats = _proc_stats(t0, c0)
    m.stop()
    if client:
        client.loop_stop()
        client.disconnect()
    d = lambda k: sum(b["streams"][s][k] - a["streams"][s][k] for s in b["streams"])  # noqa: E731
    read, proc, drop = d("frames_read"), d("frames_processed"), d("frames_dropped")
    ages = [b["streams"][s]["frame_age_ms"]["p50"] for s in b["streams"]]
    ages95 = [b["streams"][s]["frame_age_ms"]["p95"] for s in b["streams"]]
    lat = [b["streams"][s]["latency_ms"]["p50"] for s in b["streams"]]
    return {"fps": round(proc / el, 2), "input_fps": round(read / el, 2), "drop_rate": round(drop / max(read, 1), 3),
            "frame_age_p50_ms": round(statistics.median(ages), 1), "frame_age_p95_ms": round(max(ages95), 1),
            "latency_p50_ms": round(statistics.median(lat), 1), "workers": b["workers"], "threads": b["threads"],
            "published": sum(b["streams"][s]["detections_published"] for s in b["streams"]), **stats}


def one(args: argparse.Namespace) -> None:
    spec = json.loads(args.one)
    if spec["kind"] == "bare":
        res = run_bare(spec["model"], spec["n"], spec["video"], spec["seconds"], spec["threads"])
    else:
        res = run_agent(spec["model"], spec["n"], spec["video"], spec["seconds"], spec["kind"] != "agent",
                        spec.get("workers", 0), spec.get("threads", 0), spec.get("mqtt_port"))
    print("RESULT " + json.dumps(res), flush=True)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, YOLO_OFFLINE="1")
    p = subprocess.run([PY, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env, timeout=300)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"measurement failed: {spec}\n{p.stderr[-2000:]}")


# ---------------------------------------------------------------- orchestration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path)
    ap.add_argument("--pruned", type=Path)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--skip-layouts", action="store_true")
    ap.add_argument("--table", type=Path, help="only print the tables of a results.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    if args.table:
        return print(table(json.loads(args.table.read_text())))
    OUT.mkdir(parents=True, exist_ok=True)
    if args.base and args.pruned:
        models = {"yolov8n": args.base, "yolov8n-pruned50": args.pruned}
    else:
        b, p = make_models()
        models = {"yolov8n": b, "yolov8n-pruned50": p}
    video = str(make_video(OUT / "cam_640x480_25fps.mp4"))
    from prune_pack.agent.streams import cpu_count

    cores = cpu_count()
    broker = Mosquitto()
    port = broker.port if broker.proc else None
    results: dict[str, Any] = {"cores": cores, "seconds": args.seconds, "reps": args.reps, "mqtt": port is not None,
                               "load_avg_start": os.getloadavg(), "runs": []}
    try:
        if not args.skip_layouts:  # the measurement behind plan_parallelism's default
            for rep in range(args.reps):
                for n in (1, 2):
                    for w, t in ((1, cores), (cores, 1)):
                        spec = {"kind": "agent-block", "model": str(models["yolov8n"]), "n": n, "video": video,
                                "seconds": args.seconds, "workers": w, "threads": t}
                        r = measure(spec)
                        results["runs"].append({"group": "layout", "n": n, "layout": f"{w}x{t}", "rep": rep, **r})
                        print(f"layout n={n} {w}x{t}: {r['fps']} fps cpu {r['cpu_percent']}%", flush=True)
        for name, model in models.items():
            for n in args.streams:
                for rep in range(args.reps):
                    for kind in ("bare", "agent", "agent-same"):  # interleaved: load drifts between runs
                        spec = {"kind": kind, "model": str(model), "n": n, "video": video, "seconds": args.seconds,
                                "threads": cores, "mqtt_port": port if kind == "agent" else None}
                        if kind == "agent":
                            spec["threads"] = 0  # the default plan
                        elif kind == "agent-same":
                            spec["workers"] = 1
                        r = measure(spec)
                        results["runs"].append({"group": "streams", "model": name, "n": n, "kind": kind, "rep": rep, **r})
                        print(f"{name} n={n} {kind}: {json.dumps(r)}", flush=True)
    finally:
        broker.stop()
    results["load_avg_end"] = os.getloadavg()
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    per_core = lambda rs: statistics.median(r["fps"] / max(r["cpu_percent"], 1e-6) * 100 for r in rs)  # noqa: E731
    lines = ["| model | streams | bare fps | agent fps | agent / min(bare, offered) | agent-same fps | agent-same / bare | "
             "bare / agent fps per CPU-second | drop rate | frame age p50 / p95 ms | latency p50 ms | "
             "CPU % bare / agent | RSS MB bare / agent |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["n"]) for r in runs if r["group"] == "streams"})
    for model, n in keys:
        def pick(kind: str) -> list[dict]:
            return [r for r in runs if r["group"] == "streams" and r["model"] == model and r["n"] == n and r["kind"] == kind]

        bare, ag, same = pick("bare"), pick("agent"), pick("agent-same")
        # Ratios per rep (neighbouring runs share the machine's load), then the median.
        r_ag = statistics.median(a["fps"] / min(b["fps"], 25.0 * n) for a, b in zip(ag, bare))
        r_same = statistics.median(a["fps"] / b["fps"] for a, b in zip(same, bare))
        lines.append(f"| {model} | {n} | {med(bare, 'fps'):.1f} | {med(ag, 'fps'):.1f} | {r_ag:.2f} | {med(same, 'fps'):.1f} | "
                     f"{r_same:.2f} | {per_core(bare):.1f} / {per_core(ag):.1f} | {med(ag, 'drop_rate'):.2f} | "
                     f"{med(ag, 'frame_age_p50_ms'):.0f} / {med(ag, 'frame_age_p95_ms'):.0f} | {med(ag, 'latency_p50_ms'):.0f} | "
                     f"{med(bare, 'cpu_percent'):.0f} / {med(ag, 'cpu_percent'):.0f} | {med(bare, 'rss_mb'):.0f} / {med(ag, 'rss_mb'):.0f} |")
    lay = [r for r in runs if r["group"] == "layout"]
    if lay:
        lines += ["", "| streams | workers x threads | fps per rep (yolov8n 640, unpaced, block) | fps per CPU-second | CPU % |",
                  "|---|---|---|---|---|"]
        for n, layout in sorted({(r["n"], r["layout"]) for r in lay}):
            rs = [r for r in lay if r["n"] == n and r["layout"] == layout]
            lines.append(f"| {n} | {layout} | {', '.join(str(r['fps']) for r in rs)} | {per_core(rs):.1f} | "
                         f"{med(rs, 'cpu_percent'):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
