"""Cost of fleet monitoring, in one run:

(a) telemetry size: a telemetry/2 message vs the same message in the telemetry/1 shape (no
    histogram, no detections by class, streams keyed by name), per stream count;
(b) the exporter's work: ``FleetState.on_message`` per telemetry message, and one scrape
    (``FleetCollector`` + ``generate_latest``) for 100 and 1000 devices x 2 streams.

    python bench/monitoring.py [--devices 100,1000] [--streams 2]

Messages are shaped like the agent's (agent.metrics buckets, every drop reason, 5 classes).
"""

from __future__ import annotations

import argparse
import json
import time

from prune_pack.agent.metrics import LATENCY_BUCKETS_S, LatencyHistogram
from prune_pack.agent.streams import DROP_REASONS


def stream(name: str, i: int) -> dict:
    h = LatencyHistogram()
    for k in range(500):
        h.observe(0.02 + 0.00005 * ((k * 7919 + i) % 400))
    return {"stream": name, "state": "up", "reason": None, "source": f"rtsp://cam-{i}/{name}", "frames_read": 520,
            "frames_processed": 500, "frames_dropped": 20, "dropped_by_reason": {r: 4 if r == "queue_full" else 0 for r in DROP_REASONS},
            "in_flight": 0, "input_fps": 25.0, "processed_fps": 24.1, "frame_age_ms": {"p50": 3.1, "p95": 9.8},
            "latency_ms": {"p50": 30.2, "p95": 38.4, "p99": 39.6}, "opens": 1, "loops": 0, "errors": 0,
            "last_error": None, "detections_published": 0, "detections_suppressed": 0, "publish_errors": 0,
            "output_errors": 0, "latency_seconds": h.to_dict(),
            "detections_by_class": {c: 100 + i for c in ("person", "car", "truck", "bicycle", "forklift")}}


def telemetry(site: str, dev: str, seq: int, n_streams: int, i: int) -> dict:
    return {"schema": "telemetry/2", "device_id": dev, "site": site, "session": 3, "seq": seq,
            "ts_ms": int(time.time() * 1000), "cpu_percent": 150.0, "system_cpu_percent": 80.0, "rss_mb": 310.5,
            "load": [1.2, 1.1, 1.0], "temperature_c": 55.0, "uptime_s": 3600.0,
            "model": {"id": "m1", "name": "line-detector", "version": 7, "sha256": "a" * 64, "precision": "int8",
                      "backend": "ort", "target_ms": 40.0},
            "streams": [stream(f"cam{k}", i) for k in range(n_streams)],
            "queue": {"pending": 0, "dropped": 0}, "detections_dropped": 0,
            "inference": {"workers": 2, "threads": 1, "backend": "ort", "swaps": 0, "uptime_s": 3600.0,
                          "started_ts_ms": int(time.time() * 1000) - 3_600_000}}


def as_v1(body: dict) -> dict:
    old = {k: v for k, v in body.items() if k != "streams"}
    old["schema"] = "telemetry/1"
    old["streams"] = {s["stream"]: {k: v for k, v in s.items() if k not in ("stream", "latency_seconds", "detections_by_class")}
                      for s in body["streams"]}
    old["inference"] = {k: v for k, v in body["inference"].items() if k != "started_ts_ms"}
    return old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="100,1000")
    ap.add_argument("--streams", type=int, default=2)
    a = ap.parse_args()
    from prometheus_client import CollectorRegistry, generate_latest

    from prune_pack.deploy.exporter import FleetCollector
    from prune_pack.deploy.fleetstate import FleetState

    out: dict = {"buckets": len(LATENCY_BUCKETS_S), "size": {}, "exporter": {}}
    for n in (1, 2, 4):
        b = telemetry("s", "d", 1, n, 0)
        v2, v1 = len(json.dumps(b, separators=(",", ":"))), len(json.dumps(as_v1(b), separators=(",", ":")))
        out["size"][f"{n}_streams"] = {"v2_bytes": v2, "v1_bytes": v1, "ratio": round(v2 / v1, 2)}
    for n_dev in (int(x) for x in a.devices.split(",")):
        state = FleetState("prunepack", history_points=0)
        msgs = [(f"prunepack/site{i % 10}/dev{i}/telemetry", json.dumps(telemetry(f"site{i % 10}", f"dev{i}", 1, a.streams, i)).encode())
                for i in range(n_dev)]
        t0 = time.perf_counter()
        for topic, payload in msgs:
            state.on_message(topic, payload)
        ingest = time.perf_counter() - t0
        reg = CollectorRegistry(auto_describe=False)
        reg.register(FleetCollector(state))
        generate_latest(reg)  # warm
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            text = generate_latest(reg)
        scrape = (time.perf_counter() - t0) / reps
        out["exporter"][f"{n_dev}_devices"] = {"ingest_us_per_message": round(ingest / n_dev * 1e6, 1),
                                               "scrape_ms": round(scrape * 1e3, 1), "scrape_bytes": len(text),
                                               "series": sum(1 for line in text.decode().splitlines() if line and line[0] != "#")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
