"""Prometheus metric names and labels of prune-pack: the one mapping from a device's status and
telemetry/2 to metric families, used by the fleet exporter (``deploy.exporter``, many devices,
fed by MQTT) and by the agent's optional own ``/metrics`` (``agent.metrics_listen``, one device).
``monitoring/`` (alert rules, Grafana dashboard) is written against these names.

prometheus-client is optional on a device (``pip install 'prune-pack[metrics]'``); it is imported
only when families are built.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

log = logging.getLogger("prune_pack.agent.prom")

DEV = ("site", "device")
STREAM = ("site", "device", "stream")
STATES = ("online", "offline", "lost", "unknown")

GAUGES = (
    ("device_up", "1 when the device's retained status is online", DEV),
    ("device_state", "1 for the device's current state (online, offline, lost, unknown)", DEV + ("state",)),
    ("latency_target_seconds", "the active package's latency target (p95)", DEV),
    ("last_telemetry_timestamp_seconds", "device clock (ts_ms) of the newest telemetry taken", DEV),
    ("cpu_percent", "agent process CPU, 100 = one core", DEV),
    ("rss_bytes", "agent process resident memory", DEV),
    ("outbox_pending", "messages waiting in the device's offline queue", DEV),
    ("harvest_paused", "1 while the device's frame harvesting is paused", DEV),
    ("agent_degraded", "1 while the agent reports itself degraded (telemetry health: e.g. its state disk is full)", DEV),
    ("stream_up", "1 while the stream delivers frames", STREAM),
    ("stream_fps", "processed frames per second (device, last 5 s)", STREAM),
    ("stream_input_fps", "frames read per second (device, last 5 s)", STREAM),
    ("inference_latency_p95_seconds", "device-computed p95 over its last 256 frames (for humans)", STREAM),
)
COUNTERS = (
    ("frames_read", "frames read from the source", STREAM),
    ("frames_processed", "frames run through the model", STREAM),
    ("frames_dropped", "frames dropped, by reason", STREAM + ("reason",)),
    ("detections", "detections, by class name", STREAM + ("class",)),
)


def num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def streams_of(telemetry: dict) -> list[dict]:
    """The per-stream objects of telemetry/2 (a list), or of telemetry/1 (an object keyed by name)."""
    s = telemetry.get("streams") or []
    if isinstance(s, dict):
        return [{"stream": k, **v} for k, v in s.items() if isinstance(v, dict)]
    return [x for x in s if isinstance(x, dict) and isinstance(x.get("stream"), str)]


def le_text(bound: Any) -> str:
    """Prometheus' ``le`` text of a bound, the same for every device (0.005 -> "0.005")."""
    return repr(float(bound))


class Families:
    """One scrape's metric families; ``add_device`` for each device, then iterate."""

    def __init__(self) -> None:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        self.g = {n: GaugeMetricFamily(f"prunepack_{n}", h, labels=list(lab)) for n, h, lab in GAUGES}
        self.c = {n: CounterMetricFamily(f"prunepack_{n}", h, labels=list(lab)) for n, h, lab in COUNTERS}
        self.hist = HistogramMetricFamily("prunepack_inference_latency_seconds",
                                          "inference latency per frame (preprocess + model + NMS)", labels=list(STREAM))
        self.info = InfoMetricFamily("prunepack_model", "the active model of each device", labels=list(DEV))

    def __iter__(self) -> Iterator[Any]:
        yield from self.g.values()
        yield from self.c.values()
        yield self.hist
        yield self.info

    def add_device(self, site: str, device: str, state: str, model: Optional[dict], telemetry: dict) -> None:
        g, dl = self.g, [site, device]
        g["device_up"].add_metric(dl, 1.0 if state == "online" else 0.0)
        for s in STATES:
            g["device_state"].add_metric(dl + [s], 1.0 if state == s else 0.0)
        if model:
            self.info.add_metric(dl, {k: str(model.get(k, "")) for k in ("name", "version", "sha256", "precision", "backend")})
            if num(model.get("target_ms")):
                g["latency_target_seconds"].add_metric(dl, num(model["target_ms"]) / 1000)  # type: ignore[operator]
        if not telemetry:
            return
        g["last_telemetry_timestamp_seconds"].add_metric(dl, (num(telemetry.get("ts_ms")) or 0) / 1000)
        for name, key, scale in (("cpu_percent", "cpu_percent", 1.0), ("rss_bytes", "rss_mb", 2.0 ** 20)):
            if num(telemetry.get(key)) is not None:
                g[name].add_metric(dl, num(telemetry[key]) * scale)  # type: ignore[operator]
        queue = telemetry.get("queue")
        if isinstance(queue, dict) and num(queue.get("pending")) is not None:
            g["outbox_pending"].add_metric(dl, num(queue["pending"]))
        health = telemetry.get("health")
        if isinstance(health, dict) and isinstance(health.get("degraded"), bool):
            g["agent_degraded"].add_metric(dl, 1.0 if health["degraded"] else 0.0)
        paused = _harvest_paused(telemetry.get("harvest"))
        if paused is not None:
            g["harvest_paused"].add_metric(dl, 1.0 if paused else 0.0)
        for s in streams_of(telemetry):
            self._stream(dl + [s["stream"]], s)

    def _stream(self, sl: list[str], s: dict) -> None:
        # No ``_created`` series: in the text format they are one more series per counter, and Prometheus
        # finds an agent restart from the counters' reset anyway.
        g, c = self.g, self.c
        g["stream_up"].add_metric(sl, 1.0 if s.get("state") == "up" else 0.0)
        for name, key in (("stream_fps", "processed_fps"), ("stream_input_fps", "input_fps")):
            if num(s.get(key)) is not None:
                g[name].add_metric(sl, num(s[key]))
        p95 = num((s.get("latency_ms") or {}).get("p95"))
        if p95 is not None:
            g["inference_latency_p95_seconds"].add_metric(sl, p95 / 1000)
        for key in ("frames_read", "frames_processed"):
            if num(s.get(key)) is not None:
                c[key].add_metric(sl, num(s[key]))
        for label, family, key in (("reason", "frames_dropped", "dropped_by_reason"),
                                   ("class", "detections", "detections_by_class")):
            for k, n in (s.get(key) or {}).items():
                if num(n) is not None:
                    c[family].add_metric(sl + [str(k)], num(n))
        h = s.get("latency_seconds")
        if isinstance(h, dict) and len(h.get("bounds") or []) == len(h.get("counts") or []):
            buckets = [(le_text(b), float(n)) for b, n in zip(h["bounds"], h["counts"])]
            buckets.append(("+Inf", float(num(h.get("count")) or 0)))
            self.hist.add_metric(sl, buckets, sum_value=float(num(h.get("sum")) or 0.0))


def _harvest_paused(harvest: Any) -> Optional[bool]:
    """Telemetry ``harvest``: ``state`` active/paused (off or absent: no series)."""
    if not isinstance(harvest, dict):
        return None
    if harvest.get("state") in ("active", "paused"):
        return harvest["state"] == "paused"
    return harvest["paused"] if isinstance(harvest.get("paused"), bool) else None


class AgentCollector:
    """The agent's own ``/metrics``: this device, from the telemetry it last built."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        d = self.daemon
        fam = Families()
        tel = d.last_telemetry or {}
        fam.add_device(d.device.site, d.device.id, "online", tel.get("model"), tel)
        yield from fam


def serve(listen: str, collector: Any) -> Optional[Any]:
    """Start ``/metrics`` on ``listen`` (HOST:PORT); None (and a warning) without prometheus-client."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        log.warning("agent.metrics_listen is set but prometheus-client is not installed "
                    "(pip install 'prune-pack[metrics]'); no /metrics")
        return None
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    httpd, _ = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
    return httpd
