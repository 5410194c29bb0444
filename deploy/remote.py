"""Host side of the MQTT protocol (docs/mqtt.md): send commands to a device's agent and read
the fleet from the retained status topics.

``RemoteDevice(mqtt, device_id, site)`` keeps one paho connection (host credentials from the
same ``mqtt`` config section); ``call`` checks that the device's retained status is
``online``, publishes ``cmd/{name}`` with a unique ``request_id`` (after subscribing to the
answers) and waits for ``cmd/{name}/res``, retrying on timeout. Used by ``prune-pack deploy``,
``prune-pack devices`` and the build loop's remote mode (``profile_package``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from prune_pack.agent.mqtt import Topics, make_client, redact
from prune_pack.agent.settings import MqttSection
from prune_pack.errors import DeviceUnavailable, PackageRejected, PrunePackError, UserInputError

MiB = 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
STATUS_WAIT_S = 3.0  # how long to wait for the retained status after subscribing


def json_object(payload: bytes) -> Optional[dict]:
    """A message's JSON object, or None for anything else (foreign or broken messages are ignored)."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class RemoteCommandError(PrunePackError):
    """The device answered ``ok: false``; ``reason`` is the device's stable code."""

    def __init__(self, device: str, cmd: str, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{device}: {cmd} failed: {reason}" + (f" ({detail})" if detail else ""))


def _package_reasons() -> tuple[str, ...]:
    from prune_pack.agent.package import REASONS

    return tuple(REASONS)


def _fmt_ts(ts_ms: Optional[int]) -> str:
    if not ts_ms:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts_ms / 1000)) + "Z"


def _connect(mqtt: MqttSection, client_id: str) -> Any:
    """A connected host client (paho 2.x), or a one-line error."""
    if not mqtt.broker:
        raise UserInputError("no MQTT broker: set mqtt.broker in the config or pass --broker mqtt://host:1883")
    client = make_client(mqtt, client_id)
    connected = threading.Event()
    failure: list[str] = []

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            failure.append(str(rc))
        connected.set()

    client.on_connect = on_connect
    host, port = client._prune_pack_target  # noqa: SLF001
    try:
        client.connect(host, port, keepalive=mqtt.keepalive_s)
    except OSError as e:
        raise DeviceUnavailable(f"cannot reach the MQTT broker {redact(mqtt.broker)}: {e}") from None
    client.loop_start()
    if not connected.wait(CONNECT_TIMEOUT_S) or failure:
        client.loop_stop()
        why = failure[0] if failure else f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
        raise DeviceUnavailable(f"MQTT broker {redact(mqtt.broker)} refused the connection: {why}")
    return client


class RemoteDevice:
    """One device's agent, reached through the broker."""

    def __init__(self, mqtt: MqttSection, device_id: str, site: str = "default", broker: Optional[str] = None,
                 max_inline_mb: float = 16.0, command_key: Any = None, shared: Any = None) -> None:
        if "/" in device_id:  # "site/device" is accepted everywhere a device id is
            site, device_id = device_id.split("/", 1)
        self.mqtt = dataclasses.replace(mqtt, broker=broker or mqtt.broker)
        self.device_id, self.site = device_id, site
        self.topics = Topics(self.mqtt.prefix, site, device_id)
        self.max_inline_mb = max_inline_mb
        self.command_key = command_key  # signs commands (agent.cmdauth); None = the user's key, if any
        self.status: Optional[dict] = None
        self._cond = threading.Condition()
        self._answers: dict[str, dict] = {}
        self.client: Any = None
        self.shared = shared  # a deploy.fleet.FleetLink: one connection for many devices (rollout)

    @property
    def name(self) -> str:
        return f"{self.site}/{self.device_id}"

    # ------------------------------------------------------------ connection
    def __enter__(self) -> "RemoteDevice":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connect(self) -> None:
        if self.client is not None:
            return
        if self.shared is not None:  # already subscribed to every device's status and answers
            self.client = self.shared.client
            self.shared.attach(self)
            return
        client = _connect(self.mqtt, f"prune-pack-host-{uuid.uuid4().hex[:10]}")
        client.on_message = self._on_message
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        # Answers first, then the status: the command goes out only after both are subscribed.
        client.subscribe([(self.topics.result("+"), 1), (self.topics.status, 1)])
        if not subscribed.wait(CONNECT_TIMEOUT_S):
            client.loop_stop()
            raise DeviceUnavailable(f"the broker did not confirm the subscription for {self.name}")
        self.client = client

    def close(self) -> None:
        if self.shared is not None:
            self.shared.detach(self)
            self.client = None
        elif self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        body = json_object(msg.payload)
        if body is None:
            return
        with self._cond:
            if msg.topic == self.topics.status:
                self.status = body
            elif isinstance(body.get("request_id"), str):
                self._answers[body["request_id"]] = body
            self._cond.notify_all()

    def wait_status(self, timeout: float = STATUS_WAIT_S) -> Optional[dict]:
        """The device's retained status (None when it never reported one)."""
        self.connect()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.status is None and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return self.status

    def _require_online(self) -> None:
        st = self.wait_status()
        if st is None:
            raise DeviceUnavailable(f"device {self.name} has never reported a status on {redact(self.mqtt.broker)} "
                                    f"(wrong id/site, or it never connected)")
        if st.get("state") != "online":
            raise DeviceUnavailable(f"device {self.name} is {st.get('state')} since {_fmt_ts(st.get('ts_ms'))}")

    # ------------------------------------------------------------ commands
    def call(self, cmd: str, payload: Optional[dict] = None, timeout: float = 30.0, retries: int = 1) -> dict:
        """Send ``cmd`` and return the answer's ``result``; raises ``DeviceUnavailable`` (offline,
        no answer after ``retries`` extra attempts), ``PackageRejected`` or ``RemoteCommandError``."""
        self._require_online()
        request_id = uuid.uuid4().hex
        body = json.dumps(self._signed(cmd, {**(payload or {}), "request_id": request_id}))
        for attempt in range(retries + 1):
            self.client.publish(self.topics.cmd(cmd), body, qos=1)
            deadline = time.monotonic() + timeout
            with self._cond:
                while request_id not in self._answers and time.monotonic() < deadline:
                    if self.status and self.status.get("state") != "online":
                        raise DeviceUnavailable(f"device {self.name} went {self.status.get('state')} while running {cmd}")
                    self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                answer = self._answers.pop(request_id, None)
            if answer is not None:
                return self._result(cmd, answer)
        raise DeviceUnavailable(f"device {self.name} did not answer {cmd} within {timeout:.0f} s "
                                f"({retries + 1} attempt{'s' if retries else ''})")

    def _signed(self, cmd: str, request: dict) -> dict:
        """Every request is signed when the host has a command key (read-only ones ignore it)."""
        from prune_pack.agent.cmdauth import host_command_key, sign_request

        key = host_command_key(self.command_key)
        return sign_request(cmd, request, key, self.name) if key is not None else request

    def _result(self, cmd: str, answer: dict) -> dict:
        if answer.get("ok") is True:
            return answer.get("result") or {}
        err = answer.get("error") or {}
        reason, detail = str(err.get("reason", "unknown")), str(err.get("detail", ""))
        if reason in _package_reasons():
            raise PackageRejected(reason, f"{self.name}: {detail}")
        raise RemoteCommandError(self.name, cmd, reason, detail)

    def _package_args(self, package: str | Path) -> dict:
        s = str(package)
        if s.startswith(("http://", "https://", "file://")):
            return {"url": s}  # fetched by the device itself
        p = Path(package)
        if not p.is_file():
            raise UserInputError(f"package not found: {p}")
        size = p.stat().st_size
        if size > self.max_inline_mb * MiB:
            raise UserInputError(f"{p} is {size / MiB:.1f} MiB, over agent.max_inline_mb={self.max_inline_mb}: "
                                 "put it where the device can read it and pass an http(s):// or file:// URL")
        return {"package_b64": base64.b64encode(p.read_bytes()).decode("ascii")}

    def ping(self, timeout: float = 10.0) -> dict:
        return self.call("ping", timeout=timeout)

    def profile_package(self, package: str | Path, backend: Optional[str] = None, precision: Optional[str] = None,
                        runs: Optional[int] = None, warmup: Optional[int] = None, seconds: Optional[float] = None,
                        threads: Optional[int] = None, timeout: float = 300.0, retries: int = 1,
                        force: bool = False) -> dict:
        """Profile a candidate on the device, in isolation (the device never activates it)."""
        args = self._package_args(package)
        for k, v in (("backend", backend), ("precision", precision), ("runs", runs), ("warmup", warmup),
                     ("seconds", seconds), ("threads", threads)):
            if v is not None:
                args[k] = v
        if force:
            args["force"] = True
        return self.call("profile", args, timeout=timeout, retries=retries)

    def deploy_package(self, package: str | Path, force: bool = False, timeout: float = 120.0) -> dict:
        """Deploy and activate. Not retried: a late answer of the first attempt is still taken."""
        args = self._package_args(package)
        if force:
            args["force"] = True
        return self.call("deploy", args, timeout=timeout, retries=0)


def fleet(mqtt: MqttSection, wait_s: float = 2.0, broker: Optional[str] = None) -> list[dict]:
    """Every device that has a retained status under ``mqtt.prefix``, with its last telemetry."""
    mqtt = dataclasses.replace(mqtt, broker=broker or mqtt.broker)
    client = _connect(mqtt, f"prune-pack-fleet-{uuid.uuid4().hex[:10]}")
    seen: dict[tuple[str, str], dict] = {}
    lock = threading.Lock()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 4:
            return
        body = json_object(msg.payload)
        if body is None:
            return
        with lock:
            entry = seen.setdefault((parts[1], parts[2]), {"site": parts[1], "device": parts[2]})
            entry[parts[3]] = body

    client.on_message = on_message
    client.subscribe([(f"{mqtt.prefix}/+/+/status", 1), (f"{mqtt.prefix}/+/+/telemetry", 0)])
    time.sleep(wait_s)
    client.disconnect()
    client.loop_stop()
    out = []
    with lock:
        for (site, dev), e in sorted(seen.items()):
            st, tel = e.get("status") or {}, e.get("telemetry")
            model = st.get("model") or (tel or {}).get("model")
            out.append({
                "site": site, "device": dev, "state": st.get("state", "unknown"), "since_ts_ms": st.get("ts_ms"),
                "session": st.get("session"), "agent_version": st.get("agent_version"),
                "model": model, "last_telemetry_ts_ms": (tel or {}).get("ts_ms"),
                "cpu_percent": (tel or {}).get("cpu_percent"), "rss_mb": (tel or {}).get("rss_mb"),
                "queue": (tel or {}).get("queue"),
            })
    return out


# ---------------------------------------------------------------- CLI


def cli_deploy(args: Any, cfg: Any) -> dict:
    with RemoteDevice(cfg.mqtt, args.device, cfg.device.site, broker=args.broker,
                      max_inline_mb=cfg.agent.max_inline_mb) as dev:
        res = dev.deploy_package(args.package, force=args.force, timeout=args.timeout)
    m = res.get("active") or {}
    p50 = (res.get("profile") or {}).get("p50_ms")
    state = "activated" if res.get("changed", True) else "already active"
    return {**res, "device": dev.name,
            "summary": f"{dev.name}: {m.get('name')} v{m.get('version')} ({str(m.get('sha256'))[:12]}) {state}"
                       + (f", p50 {p50:.2f} ms" if isinstance(p50, (int, float)) else "")}


def _device_rollouts(rollouts: dict[str, dict]) -> dict[str, str]:
    """device -> "ID:result" of the newest rollout (retained state) that includes it."""
    out: dict[str, tuple[int, str]] = {}
    for rid, r in rollouts.items():
        ts = int(r.get("started_ts_ms") or 0)
        for dev, phase in (r.get("devices") or {}).items():
            if dev not in out or ts > out[dev][0]:
                out[dev] = (ts, f"{rid}:{phase}" + ("*" if r.get("state") in ("running", "aborting") else ""))
    return {d: v for d, (_, v) in out.items()}


def cli_devices(args: Any, cfg: Any) -> dict:
    """Per device: state, model, live p95 vs the gate of its rollout, last seen, rollout. One
    connection; returns as soon as the retained burst is over (``--wait`` is the upper bound)."""
    from prune_pack.deploy.fleet import FleetLink, telemetry_p95

    with FleetLink(cfg.mqtt, broker=args.broker, results=False).connect(wait_s=args.wait) as link:
        snap, rollouts = link.snapshot(), dict(link.rollouts)
    in_rollout = _device_rollouts(rollouts)
    gates = {rid: r.get("gate_p95_ms") for rid, r in rollouts.items()}
    devices = []
    for name, e in sorted(snap.items()):
        st, tel = e.get("status") or {}, e.get("telemetry")
        model = st.get("model") or (tel or {}).get("model")
        ro = in_rollout.get(name)
        devices.append({
            "site": e["site"], "device": e["device"], "state": st.get("state", "unknown"), "since_ts_ms": st.get("ts_ms"),
            "session": st.get("session"), "agent_version": st.get("agent_version"), "model": model,
            "last_seen_ts_ms": e.get("seen_ms"), "last_telemetry_ts_ms": (tel or {}).get("ts_ms"),
            "p95_ms": telemetry_p95(tel), "target_ms": gates.get(ro.split(":")[0]) if ro else None,
            "cpu_percent": (tel or {}).get("cpu_percent"), "rss_mb": (tel or {}).get("rss_mb"),
            "queue": (tel or {}).get("queue"), "rollout": ro,
        })
    lines = [f"{'DEVICE':<28} {'STATE':<8} {'MODEL':<30} {'SHA256':<12} {'P95/TARGET MS':<14} {'LAST SEEN':<21} ROLLOUT"]
    for d in devices:
        m = d["model"] or {}
        model = f"{m.get('name')} v{m.get('version')} {m.get('precision')}" if m else "-"
        p95 = f"{d['p95_ms']:.1f}" if d["p95_ms"] is not None else "-"
        tgt = f"{d['target_ms']:g}" if isinstance(d["target_ms"], (int, float)) else "-"
        lines.append(f"{d['site'] + '/' + d['device']:<28} {d['state']:<8} {model:<30} {str(m.get('sha256') or '-')[:12]:<12} "
                     f"{p95 + '/' + tgt:<14} {_fmt_ts(d['last_seen_ts_ms']):<21} {d['rollout'] or '-'}")
    if not devices:
        lines = [f"no devices under {cfg.mqtt.prefix}/ on {redact(args.broker or cfg.mqtt.broker)}"]
    return {"devices": devices, "summary": "\n".join(lines)}
