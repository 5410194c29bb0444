"""The fleet as the host sees it: one MQTT connection for many devices, device selectors, and
the one place that reads latency out of telemetry.

``FleetLink`` subscribes once to every device's retained status and telemetry, to every command
answer and to the retained rollout states (``{prefix}/_rollout/{id}``), and routes answers to the
``RemoteDevice`` objects attached to it; a rollout to 500 devices thus uses one connection, and
every command still goes through ``RemoteDevice.call`` (the same checks as ``prune-pack deploy``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from prune_pack.agent.settings import MqttSection
from prune_pack.deploy.remote import json_object
from prune_pack.errors import DeviceUnavailable, UserInputError

ROLLOUT_TOPIC = "_rollout"  # {prefix}/_rollout/{id}: 3 levels, never a device topic (those have 4+)
QUIET_S = 0.3  # retained messages arrive in one burst after SUBACK; this much silence ends it


# ---------------------------------------------------------------- telemetry accessors


def _streams(tel: Optional[dict]) -> list[dict]:
    """Per-stream metric objects of a telemetry message: a dict keyed by stream name (telemetry/1)
    or a list of objects with a ``stream`` field; both are read here and nowhere else."""
    raw = (tel or {}).get("streams") or {}
    items = raw.values() if isinstance(raw, dict) else raw
    return [s for s in items if isinstance(s, dict)]


def telemetry_p95(tel: Optional[dict]) -> Optional[float]:
    """The worst live stream latency p95 (ms) a device reports, None without stream latency."""
    vals = []
    for s in _streams(tel):
        lat = s.get("latency_ms") or {}
        v = lat.get("p95") if isinstance(lat, dict) else None
        if isinstance(v, (int, float)):
            vals.append(float(v))
    return max(vals) if vals else None


def telemetry_stream_errors(tel: Optional[dict]) -> int:
    """Total stream error count (cumulative per stream) in one telemetry message."""
    return sum(int(s.get("errors") or 0) for s in _streams(tel) if isinstance(s.get("errors"), (int, float)))


def model_key(model: Optional[dict]) -> Optional[str]:
    """What identifies a package on a device: name, version and model sha256 (two versions of
    one model can share the ONNX bytes), as the status and telemetry ``model`` objects carry them."""
    if not isinstance(model, dict) or not model.get("sha256"):
        return None
    return f"{model.get('name')}@{model.get('version')}:{model.get('sha256')}"


def has_streams(tel: Optional[dict]) -> bool:
    return bool(_streams(tel))


# ---------------------------------------------------------------- selectors


def select(devices: dict[str, dict], selector: str) -> list[str]:
    """Device names (``site/id``) matching SELECTOR, sorted.

    SELECTOR is comma-separated terms: globs on ``site/id`` or on the id (``line1/*``, ``cam-0??``),
    ``@FILE`` (ids or site/ids, one per line, ``#`` comments), and ``KEY=GLOB`` field filters
    (``model``, ``version``, ``sha256``, ``agent``, ``site``, ``state``). Globs and files are a
    union; field filters narrow it (only filters = all devices filtered).
    """
    picks: set[str] = set()
    filters: list[tuple[str, str]] = []
    any_pick = False
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        if term.startswith("@"):
            any_pick = True
            path = Path(term[1:]).expanduser()
            if not path.is_file():
                raise UserInputError(f"device list not found: {path}")
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    picks |= _glob(devices, line)
        elif "=" in term:
            k, v = term.split("=", 1)
            if k not in FIELDS:
                raise UserInputError(f"unknown selector field {k!r} (known: {', '.join(FIELDS)})")
            filters.append((k, v))
        else:
            any_pick = True
            picks |= _glob(devices, term)
    chosen = picks if any_pick else set(devices)
    for k, v in filters:
        chosen = {n for n in chosen if fnmatch.fnmatchcase(str(FIELDS[k](devices[n])), v)}
    return sorted(chosen)


def spread(names: list[str]) -> list[str]:
    """Sites taken in turn (``a/1 b/1 a/2 b/2 ...``): a canary or a batch spans sites rather
    than filling one line first."""
    by_site: dict[str, list[str]] = {}
    for n in sorted(names):
        by_site.setdefault(n.split("/", 1)[0], []).append(n)
    out, queues = [], list(by_site.values())
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def _glob(devices: dict[str, dict], pattern: str) -> set[str]:
    if "/" in pattern:
        return {n for n in devices if fnmatch.fnmatchcase(n, pattern)}
    return {n for n in devices if fnmatch.fnmatchcase(n.split("/", 1)[1], pattern)}


def _model(st: dict) -> dict:
    return (st.get("status") or {}).get("model") or {}


FIELDS = {
    "model": lambda e: _model(e).get("name"),
    "version": lambda e: _model(e).get("version"),
    "sha256": lambda e: _model(e).get("sha256"),
    "agent": lambda e: (e.get("status") or {}).get("agent_version"),
    "site": lambda e: e["site"],
    "state": lambda e: (e.get("status") or {}).get("state", "unknown"),
}


# ---------------------------------------------------------------- the shared connection


class FleetLink:
    """One host connection that sees the whole fleet (see module docstring)."""

    def __init__(self, mqtt: MqttSection, broker: Optional[str] = None, telemetry: bool = True,
                 results: bool = True) -> None:
        self.mqtt = dataclasses.replace(mqtt, broker=broker or mqtt.broker)
        self.prefix = self.mqtt.prefix
        self.devices: dict[str, dict] = {}  # site/id -> {site, device, status, telemetry, seen_ms}
        self.rollouts: dict[str, dict] = {}  # rollout id -> retained state
        self.abort_requests: set[str] = set()
        self._attached: dict[str, Any] = {}  # site/id -> RemoteDevice
        self._watch: dict[str, list[dict]] = {}  # site/id -> telemetry received since watch()
        self._want_tel, self._want_res = telemetry, results
        self.cond = threading.Condition()
        self._last_retained = time.monotonic()
        self.messages = 0
        self.client: Any = None

    def connect(self, wait_s: float = 2.0) -> "FleetLink":
        """Connect, subscribe, and return once the retained burst is over (or after ``wait_s``)."""
        from prune_pack.deploy.remote import _connect

        client = _connect(self.mqtt, f"prune-pack-fleet-{uuid.uuid4().hex[:10]}")
        client.on_message = self._on_message
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        p = self.prefix
        subs = [(f"{p}/+/+/status", 1), (f"{p}/{ROLLOUT_TOPIC}/+", 1), (f"{p}/{ROLLOUT_TOPIC}/+/abort", 1)]
        if self._want_tel:
            subs.append((f"{p}/+/+/telemetry", 0))
        if self._want_res:
            subs.append((f"{p}/+/+/cmd/+/res", 1))
        self._last_retained = time.monotonic()
        client.subscribe(subs)
        self.client = client
        if not subscribed.wait(10):
            self.close()
            raise DeviceUnavailable("the broker did not confirm the fleet subscription")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with self.cond:
                quiet = time.monotonic() - self._last_retained
            if quiet >= QUIET_S:
                break
            time.sleep(min(QUIET_S - quiet, max(0.0, deadline - time.monotonic())) + 0.01)
        return self

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def __enter__(self) -> "FleetLink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- routing (paho's network thread)
    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        self.messages += 1
        if msg.retain:
            self._last_retained = time.monotonic()
        if len(parts) >= 3 and parts[1] == ROLLOUT_TOPIC:
            body = json_object(msg.payload) if msg.payload else None
            with self.cond:
                if len(parts) == 4 and parts[3] == "abort" and body is not None:
                    self.abort_requests.add(parts[2])
                elif len(parts) == 3 and body is not None:
                    self.rollouts[parts[2]] = body
                self.cond.notify_all()
            return
        if len(parts) < 4:
            return
        body = json_object(msg.payload)
        if body is None:
            return
        name = f"{parts[1]}/{parts[2]}"
        with self.cond:
            if len(parts) == 4 and parts[3] in ("status", "telemetry"):
                e = self.devices.setdefault(name, {"site": parts[1], "device": parts[2]})
                e[parts[3]] = body
                if isinstance(body.get("ts_ms"), int):
                    e["seen_ms"] = max(e.get("seen_ms", 0), body["ts_ms"])
                if parts[3] == "telemetry" and name in self._watch:
                    self._watch[name].append(body)
            dev = self._attached.get(name)
            self.cond.notify_all()
        if dev is not None:
            dev._on_message(client, userdata, msg)  # noqa: SLF001 - the device's own routing

    # ---- devices
    def attach(self, dev: Any) -> None:
        with self.cond:
            self._attached[dev.name] = dev
            st = (self.devices.get(dev.name) or {}).get("status")
        if st is not None and dev.status is None:
            dev.status = st

    def detach(self, dev: Any) -> None:
        with self.cond:
            self._attached.pop(dev.name, None)

    def status(self, name: str) -> Optional[dict]:
        with self.cond:
            return (self.devices.get(name) or {}).get("status")

    def telemetry(self, name: str) -> Optional[dict]:
        with self.cond:
            return (self.devices.get(name) or {}).get("telemetry")

    def watch(self, name: str) -> None:
        """Start collecting this device's telemetry (for a soak)."""
        with self.cond:
            self._watch[name] = []

    def watched(self, name: str) -> list[dict]:
        with self.cond:
            return list(self._watch.get(name, []))

    def unwatch(self, name: str) -> None:
        with self.cond:
            self._watch.pop(name, None)

    def wait_until(self, pred: Any, timeout: float) -> bool:
        """Wait until ``pred()`` (evaluated under the lock) is true; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def publish(self, topic: str, body: Optional[dict], retain: bool = False) -> None:
        payload = json.dumps(body, separators=(",", ":")) if body is not None else b""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(10)
        except (RuntimeError, ValueError):
            pass

    def rollout_topic(self, rid: str) -> str:
        return f"{self.prefix}/{ROLLOUT_TOPIC}/{rid}"

    def snapshot(self) -> dict[str, dict]:
        with self.cond:
            return {k: dict(v) for k, v in self.devices.items()}


def online(entry: dict) -> bool:
    return (entry.get("status") or {}).get("state") == "online"
