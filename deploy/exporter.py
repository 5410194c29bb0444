"""``prune-pack exporter``: one Prometheus ``/metrics`` for the whole fleet, fed by MQTT.

Devices only connect outward (to the broker); this process subscribes to ``{prefix}/#`` and
serves what the retained status and the newest telemetry of every device say
(``deploy.fleetstate`` decides what is newest: replays never move a value backwards). Metric
names and labels are the contract of ``monitoring/`` (alert rules and the Grafana dashboard).

Counters and the latency histogram are the device's own cumulative values, passed through with
their start time as ``_created``; they restart from zero when an agent restarts, which
Prometheus' ``rate()`` and ``increase()`` treat as a counter reset.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Iterator, Optional

from prune_pack.deploy.fleetstate import STATES, Device, FleetState, connect_fleet

log = logging.getLogger("prune_pack.deploy.exporter")

DEV = ("site", "device")
STREAM = ("site", "device", "stream")


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class FleetCollector:
    """A prometheus-client collector that renders ``FleetState`` at scrape time."""

    def __init__(self, state: FleetState, client: Any = None) -> None:
        self.state, self.client = state, client

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        g = {n: GaugeMetricFamily(f"prunepack_{n}", h, labels=list(lab)) for n, h, lab in (
            ("device_up", "1 when the device's retained status is online", DEV),
            ("device_state", "1 for the device's current state (online, offline, lost, unknown)", DEV + ("state",)),
            ("latency_target_seconds", "the active package's latency target (p95)", DEV),
            ("last_telemetry_timestamp_seconds", "device clock (ts_ms) of the newest telemetry taken", DEV),
            ("cpu_percent", "agent process CPU, 100 = one core", DEV),
            ("rss_bytes", "agent process resident memory", DEV),
            ("outbox_pending", "messages waiting in the device's offline queue", DEV),
            ("harvest_paused", "1 while the device's frame harvesting is paused", DEV),
            ("stream_up", "1 while the stream delivers frames", STREAM),
            ("stream_fps", "processed frames per second (device, last 5 s)", STREAM),
            ("stream_input_fps", "frames read per second (device, last 5 s)", STREAM),
            ("inference_latency_p95_seconds", "device-computed p95 over its last 256 frames (for humans)", STREAM),
        )}
        c = {n: CounterMetricFamily(f"prunepack_{n}", h, labels=list(lab)) for n, h, lab in (
            ("frames_read", "frames read from the source", STREAM),
            ("frames_processed", "frames run through the model", STREAM),
            ("frames_dropped", "frames dropped, by reason", STREAM + ("reason",)),
            ("detections", "detections, by class name", STREAM + ("class",)),
        )}
        hist = HistogramMetricFamily("prunepack_inference_latency_seconds",
                                     "inference latency per frame (preprocess + model + NMS)", labels=list(STREAM))
        info = InfoMetricFamily("prunepack_model", "the active model of each device",
                                labels=list(DEV))
        for d in self.state.snapshot():
            self._device(d, g, c, hist, info)
        yield from g.values()
        yield from c.values()
        yield hist
        yield info
        yield from self._own()

    @staticmethod
    def _device(d: Device, g: dict, c: dict, hist: Any, info: Any) -> None:
        dl = [d.site, d.device]
        g["device_up"].add_metric(dl, 1.0 if d.state == "online" else 0.0)
        for s in STATES:
            g["device_state"].add_metric(dl + [s], 1.0 if d.state == s else 0.0)
        m = d.model
        if m:
            info.add_metric(dl, {k: str(m.get(k, "")) for k in ("name", "version", "sha256", "precision", "backend")})
        if d.target_ms:
            g["latency_target_seconds"].add_metric(dl, float(d.target_ms) / 1000)
        t = d.telemetry
        if not t:
            return
        g["last_telemetry_timestamp_seconds"].add_metric(dl, (_num(t.get("ts_ms")) or 0) / 1000)
        for name, key, scale in (("cpu_percent", "cpu_percent", 1.0), ("rss_bytes", "rss_mb", 2.0 ** 20)):
            if _num(t.get(key)) is not None:
                g[name].add_metric(dl, _num(t[key]) * scale)  # type: ignore[operator]
        if isinstance(t.get("queue"), dict) and _num(t["queue"].get("pending")) is not None:
            g["outbox_pending"].add_metric(dl, _num(t["queue"]["pending"]))
        harvest = t.get("harvest")
        if isinstance(harvest, dict) and isinstance(harvest.get("paused"), bool):
            g["harvest_paused"].add_metric(dl, 1.0 if harvest["paused"] else 0.0)
        started = _num((t.get("inference") or {}).get("started_ts_ms"))
        created = started / 1000 if started else None
        for s in d.streams():
            sl = dl + [s["stream"]]
            g["stream_up"].add_metric(sl, 1.0 if s.get("state") == "up" else 0.0)
            for name, key in (("stream_fps", "processed_fps"), ("stream_input_fps", "input_fps")):
                if _num(s.get(key)) is not None:
                    g[name].add_metric(sl, _num(s[key]))
            p95 = _num((s.get("latency_ms") or {}).get("p95"))
            if p95 is not None:
                g["inference_latency_p95_seconds"].add_metric(sl, p95 / 1000)
            for name, key in (("frames_read", "frames_read"), ("frames_processed", "frames_processed")):
                if _num(s.get(key)) is not None:
                    c[name].add_metric(sl, _num(s[key]), created=created)
            for reason, n in (s.get("dropped_by_reason") or {}).items():
                if _num(n) is not None:
                    c["frames_dropped"].add_metric(sl + [str(reason)], _num(n), created=created)
            for cls, n in (s.get("detections_by_class") or {}).items():
                if _num(n) is not None:
                    c["detections"].add_metric(sl + [str(cls)], _num(n), created=created)
            h = s.get("latency_seconds")
            if isinstance(h, dict) and len(h.get("bounds") or []) == len(h.get("counts") or []):
                buckets = [(_le(b), float(n)) for b, n in zip(h["bounds"], h["counts"])]
                buckets.append(("+Inf", float(h.get("count") or 0)))
                hist.add_metric(sl, buckets, sum_value=float(h.get("sum") or 0.0))

    def _own(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        msgs = CounterMetricFamily("prunepack_exporter_messages", "MQTT messages seen, by outcome", labels=["outcome"])
        with self.state.lock:
            counts = dict(self.state.counts)
        for k, v in counts.items():
            msgs.add_metric([k], float(v))
        yield msgs
        up = GaugeMetricFamily("prunepack_exporter_broker_connected", "1 while the exporter is connected to the broker")
        up.add_metric([], 1.0 if self.client is not None and self.client.connected.is_set() else 0.0)
        yield up


def _le(bound: Any) -> str:
    """Prometheus' ``le`` text of a bound, the same for every device (0.005 -> "0.005")."""
    return repr(float(bound))


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:9108``) -> (host, port)."""
    from prune_pack.errors import UserInputError

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserInputError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9108")
    return host.strip("[]") or "127.0.0.1", int(port)


class Exporter:
    """MQTT subscriber + HTTP server; ``start()`` returns once both run (the broker may come later)."""

    def __init__(self, mqtt: Any, listen: str = "127.0.0.1:9108") -> None:
        self.mqtt, self.listen = mqtt, listen
        self.state = FleetState(mqtt.prefix)
        self.client: Any = None
        self.httpd: Any = None
        self.port = 0

    def start(self) -> "Exporter":
        from prometheus_client import CollectorRegistry, start_http_server

        host, port = parse_listen(self.listen)
        self.client = connect_fleet(self.mqtt, self.state, f"prune-pack-exporter-{uuid.uuid4().hex[:10]}")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(self.state, self.client))
        self.httpd, _ = start_http_server(port, addr=host, registry=registry)
        self.port = self.httpd.server_address[1]
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def cli_exporter(args: Any, cfg: Any) -> dict:
    """Run until SIGTERM/SIGINT."""
    import dataclasses
    import signal
    import sys

    from prune_pack.agent.mqtt import redact
    from prune_pack.agent.settings import merged
    from prune_pack.errors import MissingExtraError

    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MissingExtraError("prune-pack exporter", "host", "prometheus_client") from None
    ec = merged(cfg.exporter, listen=args.listen)
    mqtt = dataclasses.replace(cfg.mqtt, broker=args.broker or cfg.mqtt.broker)
    ex = Exporter(mqtt, ec.listen).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"exporter: http://{parse_listen(ec.listen)[0]}:{ex.port}/metrics for {mqtt.prefix}/# on {redact(mqtt.broker)}",
          file=sys.stderr)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        ex.stop()
    return {"summary": "exporter stopped", "devices": len(ex.state.devices)}
