"""The fleet as the broker shows it: the one place that turns status and telemetry messages into
per-device state, for the Prometheus exporter (``deploy.exporter``) and the live page
(``deploy.dashboard``).

Ordering rules (docs/mqtt.md, "Envelope" and "Offline queue"):

- ``status`` is taken in arrival order; an empty retained status (how an operator clears a
  decommissioned device from the broker) removes the device. It never passes through the outbox, and the Last Will
  (``seq`` 0) is published by the broker *after* that session's ``online`` status.
- ``telemetry`` is taken only when it is newer, by ``(session, seq)``, than the one held: a
  ``historical`` replay from a device's offline queue, or an at-least-once duplicate, never moves a
  gauge (or a counter) backwards. A *live* message that orders older comes from a device whose
  state folder was reset (its session counter restarted); it is taken, as a restart.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from prune_pack.agent.prom import STATES, streams_of

ROLLOUT_LEVEL = "_rollout"  # {prefix}/_rollout/{ID}: three levels, never a device topic (docs/mqtt.md)
HISTORY_POINTS = 720  # latency points kept per stream for the live page's chart


@dataclass
class Device:
    site: str
    device: str
    status: dict = field(default_factory=dict)
    telemetry: dict = field(default_factory=dict)
    tel_key: tuple[int, int] = (0, 0)
    last_seen_s: Optional[float] = None  # this host's clock when the last live message came
    history: dict[str, deque] = field(default_factory=dict)  # stream -> (device ts_s, window p95_ms)

    @property
    def key(self) -> str:
        return f"{self.site}/{self.device}"

    @property
    def state(self) -> str:
        s = self.status.get("state")
        return s if s in STATES else "unknown"

    @property
    def model(self) -> Optional[dict]:
        return self.status.get("model") or self.telemetry.get("model")

    @property
    def target_ms(self) -> Optional[float]:
        m = self.model or {}
        return m.get("target_ms")

    def streams(self) -> list[dict]:
        return streams_of(self.telemetry)  # telemetry/2's list, or telemetry/1's object keyed by name

    def row(self, now_s: Optional[float] = None) -> dict[str, Any]:
        """One line of the fleet table (the live page's JSON)."""
        now_s = time.time() if now_s is None else now_s
        m = self.model or {}
        streams = self.streams()
        p95s = [(s.get("latency_ms") or {}).get("p95") for s in streams]
        p95s = [p for p in p95s if isinstance(p, (int, float))]
        tel_ts = self.telemetry.get("ts_ms")
        return {
            "key": self.key, "site": self.site, "device": self.device, "state": self.state,
            "model": m.get("name"), "version": m.get("version"), "precision": m.get("precision"),
            "target_ms": self.target_ms, "p95_ms": max(p95s) if p95s else None,
            "fps": round(sum(float(s.get("processed_fps") or 0) for s in streams), 2),
            "dropped": sum(int(s.get("frames_dropped") or 0) for s in streams),
            "cpu_percent": self.telemetry.get("cpu_percent"), "rss_mb": self.telemetry.get("rss_mb"),
            "last_seen_ts_ms": tel_ts, "age_s": round(now_s - tel_ts / 1000, 1) if tel_ts else None,
            "streams": [s.get("stream") for s in streams],
        }


class FleetState:
    """Thread-safe; ``on_message(topic, payload)`` is called from paho's network thread."""

    def __init__(self, prefix: str = "prunepack", on_change: Optional[Callable[[Optional[Device]], None]] = None,
                 history_points: int = HISTORY_POINTS) -> None:
        self.prefix = prefix
        self.history_points = history_points
        self.on_change = on_change
        self.lock = threading.Lock()
        self.devices: dict[tuple[str, str], Device] = {}
        self.rollouts: dict[str, dict] = {}
        self.counts = {"accepted": 0, "older_ignored": 0, "invalid": 0, "other": 0}

    def on_message(self, topic: str, payload: bytes) -> Optional[Device]:
        parts = topic.split("/")
        if len(parts) == 3 and parts[0] == self.prefix and parts[1] == ROLLOUT_LEVEL:
            self._rollout(parts[2], payload)
            return None
        if len(parts) != 4 or parts[0] != self.prefix or parts[3] not in ("status", "telemetry"):
            with self.lock:
                self.counts["other"] += 1  # detections, commands, answers: not fleet state
            return None
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if not payload and parts[3] == "status":  # the retained status cleared: the device was decommissioned
            with self.lock:
                gone = self.devices.pop((parts[1], parts[2]), None)
                self.counts["accepted"] += 1
            if gone is not None and self.on_change is not None:
                self.on_change(None)
            return None
        if not isinstance(body, dict) or not body:
            with self.lock:
                self.counts["invalid"] += 1
            return None
        with self.lock:
            dev = self.devices.get((parts[1], parts[2]))
            if dev is None:
                dev = self.devices[(parts[1], parts[2])] = Device(parts[1], parts[2])
            taken = self._status(dev, body) if parts[3] == "status" else self._telemetry(dev, body)
            self.counts["accepted" if taken else "older_ignored"] += 1
        if taken and self.on_change is not None:
            self.on_change(dev)
        return dev if taken else None

    def _rollout(self, rid: str, payload: bytes) -> None:
        """``{prefix}/_rollout/{ID}`` (retained ``rollout-state/1`` of ``prune-pack rollout``; empty = gone)."""
        try:
            body = json.loads(payload) if payload else None
        except ValueError:
            body = None
        with self.lock:
            if isinstance(body, dict) and body.get("schema", "").startswith("rollout-state/"):
                self.rollouts[rid] = body
                self.counts["accepted"] += 1
            else:
                self.rollouts.pop(rid, None)
                self.counts["invalid" if payload else "accepted"] += 1
        if self.on_change is not None:
            self.on_change(None)

    def rollout_list(self) -> list[dict]:
        """Every known rollout: id, state, package, gate, and devices per phase (from its device map)."""
        with self.lock:
            items = sorted(self.rollouts.items())
        out = []
        for rid, b in items:
            phases: dict[str, int] = {}
            for ph in (b.get("devices") or {}).values():
                phases[str(ph)] = phases.get(str(ph), 0) + 1
            pkg = b.get("package") or {}
            out.append({"id": rid, "state": b.get("state"), "package": pkg.get("name"), "version": pkg.get("version"),
                        "gate_p95_ms": b.get("gate_p95_ms"), "phases": dict(sorted(phases.items())),
                        "devices": sum(phases.values()), "ts_ms": b.get("ts_ms")})
        return out

    @staticmethod
    def _status(dev: Device, body: dict) -> bool:
        dev.status = body
        return True

    def _telemetry(self, dev: Device, body: dict) -> bool:
        key = (_int(body.get("session")), _int(body.get("seq")))
        newer = key > dev.tel_key
        restarted = not newer and not body.get("historical") and key[0] < dev.tel_key[0] \
            and _int(body.get("ts_ms")) > _int(dev.telemetry.get("ts_ms"))
        if not (newer or restarted):
            return False
        dev.telemetry, dev.tel_key = body, key
        if not body.get("historical"):
            dev.last_seen_s = time.time()
        self._remember(dev, body)
        return True

    def _remember(self, dev: Device, body: dict) -> None:
        """Chart points: (device time s, each stream's window p95 ms); none with ``history_points`` 0."""
        if self.history_points <= 0:
            return
        ts = _int(body.get("ts_ms")) / 1000
        for s in dev.streams():
            p95 = (s.get("latency_ms") or {}).get("p95")
            dev.history.setdefault(s["stream"], deque(maxlen=self.history_points)).append((ts, p95))

    def snapshot(self) -> list[Device]:
        """The devices sorted by site/device, without their chart history. Shallow copies are safe:
        an update replaces ``status`` / ``telemetry`` with new objects, it never changes them."""
        with self.lock:
            return [dataclasses.replace(d, history={}) for _, d in sorted(self.devices.items())]

    def get(self, key: str) -> Optional[Device]:
        """One device (``site/device``) with a copy of its chart history, or None."""
        site, _, device = key.partition("/")
        with self.lock:
            d = self.devices.get((site, device))
            if d is None:
                return None
            return dataclasses.replace(d, history={s: deque(q, maxlen=q.maxlen) for s, q in d.history.items()})


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def fleet_filters(prefix: str) -> list[tuple[str, int]]:
    """What the fleet state is made of: every device's status and telemetry, and the rollouts' state."""
    return [(f"{prefix}/+/+/status", 1), (f"{prefix}/+/+/telemetry", 1), (f"{prefix}/{ROLLOUT_LEVEL}/+", 1)]


def connect_fleet(mqtt: Any, state: FleetState, client_id: str) -> Any:
    """A paho client that keeps ``state`` fed (``fleet_filters``; reconnects and resubscribes by itself)."""
    from prune_pack.agent.mqtt import make_client
    from prune_pack.errors import UserInputError

    if not mqtt.broker:
        raise UserInputError("no MQTT broker: set mqtt.broker in the config or pass --broker mqtt://host:1883")
    client = make_client(mqtt, client_id)
    client.connected = threading.Event()

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            # Clean session: renewed on every connect. The fleet state only, not {prefix}/# whole: the
            # detections of a large fleet (thousands a second) would cost more than all the rest.
            c.subscribe(fleet_filters(mqtt.prefix))
            c.connected.set()

    def on_disconnect(c: Any, *a: Any) -> None:
        c.connected.clear()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = lambda c, u, msg: state.on_message(msg.topic, msg.payload)
    host, port = client._prune_pack_target  # noqa: SLF001
    client.connect_async(host, port, keepalive=mqtt.keepalive_s)
    client.loop_start()
    return client
