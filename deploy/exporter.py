"""``prune-pack exporter``: one Prometheus ``/metrics`` for the whole fleet, fed by MQTT.

Devices only connect outward (to the broker); this process subscribes to the fleet's status,
telemetry and rollout topics under ``{prefix}/`` (``deploy.fleetstate.fleet_filters``) and serves what the retained status and the newest telemetry of every device say
(``deploy.fleetstate`` decides what is newest: replays never move a value backwards). Metric
names and labels are the contract of ``monitoring/`` (alert rules and the Grafana dashboard).

Counters and the latency histogram are the device's own cumulative values, passed through; they
restart from zero when an agent restarts, which Prometheus' ``rate()`` and ``increase()`` treat as
a counter reset.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, Iterator

from prune_pack.deploy.fleetstate import FleetState, connect_fleet

log = logging.getLogger("prune_pack.deploy.exporter")

class FleetCollector:
    """A prometheus-client collector that renders ``FleetState`` at scrape time (names: ``agent.prom``)."""

    def __init__(self, state: FleetState, client: Any = None) -> None:
        self.state, self.client = state, client

    def collect(self) -> Iterator[Any]:
        from prune_pack.agent.prom import Families

        fam = Families()
        for d in self.state.snapshot():
            fam.add_device(d.site, d.device, d.state, d.model, d.telemetry)
        yield from fam
        yield from self._rollouts()
        yield from self._own()

    def _rollouts(self) -> Iterator[Any]:
        """``prune-pack rollout`` progress from its retained ``{prefix}/_rollout/{ID}`` state."""
        from prometheus_client.core import GaugeMetricFamily

        running = GaugeMetricFamily("prunepack_rollout_running", "1 while the rollout runs (or aborts)",
                                    labels=["rollout", "package", "version"])
        devices = GaugeMetricFamily("prunepack_rollout_devices", "devices of the rollout, by phase",
                                    labels=["rollout", "phase"])
        for r in self.state.rollout_list():
            running.add_metric([r["id"], str(r["package"]), str(r["version"])],
                               1.0 if r["state"] in ("running", "aborting") else 0.0)
            for phase, n in r["phases"].items():
                devices.add_metric([r["id"], phase], float(n))
        yield running
        yield devices

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
        self.state = FleetState(mqtt.prefix, history_points=0)  # no charts here
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
    print(f"exporter: http://{parse_listen(ec.listen)[0]}:{ex.port}/metrics for the fleet under {mqtt.prefix}/ on {redact(mqtt.broker)}",
          file=sys.stderr)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        ex.stop()
    return {"summary": "exporter stopped", "devices": len(ex.state.devices)}
