"""Helpers shared by the daemon / MQTT / remote tests (imported as ``test_mqtt_helpers``), and
the self-tests of the shipped JSON Schemas.

``Watcher`` is a real MQTT client (user ``host``) that records every message under the prefix
and validates each one against its JSON Schema as it arrives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import paho.mqtt.client as paho
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "data" / "tiny.onnx"
SCHEMA_DIR = REPO / "agent" / "schemas"
SITE, DEV = "lab", "dev1"
BASE = f"prunepack/{SITE}/{DEV}"


# ---------------------------------------------------------------- schemas


def _registry() -> Any:
    from referencing import Registry, Resource

    resources = []
    for p in sorted(SCHEMA_DIR.glob("*.json")):
        doc = json.loads(p.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


_VALIDATORS: dict[str, Any] = {}


def validator(file: str) -> Any:
    from jsonschema import Draft202012Validator

    if file not in _VALIDATORS:
        doc = json.loads((SCHEMA_DIR / file).read_text())
        Draft202012Validator.check_schema(doc)
        _VALIDATORS[file] = Draft202012Validator(doc, registry=_registry())
    return _VALIDATORS[file]


def schema_file_for(topic: str) -> str:
    parts = topic.split("/")
    if parts[-1] == "status":
        return "status.json"
    if parts[-1] == "telemetry":
        return "telemetry.json"
    if parts[-1] == "res" and parts[-3] == "cmd":
        return "cmd-result.json"
    if parts[-2] == "detections":
        return "detections.json"
    if parts[-2] == "cmd":
        return "cmd-request.json"
    raise AssertionError(f"unexpected topic {topic}")


def check_message(topic: str, msg: Any) -> None:
    """Raise if a device message is not valid against its schema (and its topic's kind)."""
    file = schema_file_for(topic)
    validator(file).validate(msg)
    if file != "cmd-request.json":
        want = validator(file).schema.get("properties", {}).get("schema", {}).get("const", file[:-5] + "/1")
        assert msg["schema"] == want, (topic, msg["schema"])
        assert topic.split("/")[2] == msg["device_id"] and topic.split("/")[1] == msg["site"]


# ---------------------------------------------------------------- host-side watcher


class Watcher:
    """Records (topic, payload, retain) of everything under ``prunepack/#``; validates device
    messages (commands sent by tests are not validated: many are deliberately bad)."""

    def __init__(self, broker: Any, user: str = "host", topic: str = "prunepack/#") -> None:
        self.broker, self.topic = broker, topic
        self.messages: list[tuple[str, Any, bool]] = []
        self.invalid: list[str] = []
        self.cond = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"watch-{time.monotonic_ns()}")
        self.client.username_pw_set(user, broker.users[user])
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(self.topic, 1)
        self.client.reconnect_delay_set(1, 1)
        self.connect()

    def connect(self) -> None:
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "watcher could not subscribe"

    def reconnect(self) -> None:
        self.client.loop_stop()
        self.connect()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = msg.payload
        if "/cmd/" in msg.topic and not msg.topic.endswith("/res"):
            pass  # requests: test input
        else:
            try:
                check_message(msg.topic, body)
            except Exception as e:  # noqa: BLE001 - collected, asserted by the tests
                self.invalid.append(f"{msg.topic}: {str(e)[:400]}")
        with self.cond:
            self.messages.append((msg.topic, body, bool(msg.retain)))
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[str, Any], bool], timeout: float = 20.0, start: int = 0) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.messages):
                    t, b, _ = self.messages[i]
                    i += 1
                    if pred(t, b):
                        return t, b
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching message within {timeout} s; last: {[m[0] for m in self.messages[-5:]]}")
                self.cond.wait(left)

    def mark(self) -> int:
        with self.cond:
            return len(self.messages)

    def status(self, state: str, timeout: float = 20.0, start: int = 0) -> dict:
        return self.wait_for(lambda t, b: t == f"{BASE}/status" and b.get("state") == state, timeout, start)[1]

    def publish(self, cmd: str, payload: bytes | str | dict) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self.client.publish(f"{BASE}/cmd/{cmd}", payload, qos=1).wait_for_publish(5)

    def call(self, cmd: str, body: Optional[dict] = None, timeout: float = 30.0, sign: Optional[bool] = None,
             device: str = f"{SITE}/{DEV}") -> dict:
        """Send a request and wait for its answer. Signed (agent.cmdauth) with the test command key
        (``COMMAND_KEY``, set by ``agent_config``) unless ``sign`` is False."""
        rid = (body or {}).get("request_id") or f"r{time.monotonic_ns()}"
        start = self.mark()
        req = {"request_id": rid, **(body or {})}
        if sign is None:
            sign = COMMAND_KEY[0] is not None
        if sign:
            from prune_pack.agent.cmdauth import sign_request

            req = sign_request(cmd, req, COMMAND_KEY[0], device)
        self.publish(cmd, req)
        return self.wait_for(lambda t, b: t == f"{BASE}/cmd/{cmd}/res" and b.get("request_id") == rid, timeout, start)[1]

    def raw(self, cmd: str, payload: bytes | str, timeout: float = 20.0) -> dict:
        """Send anything; return the next answer on that command's result topic."""
        start = self.mark()
        self.publish(cmd, payload)
        return self.wait_for(lambda t, b: t == f"{BASE}/cmd/{cmd}/res", timeout, start)[1]

    def device_messages(self) -> list[tuple[str, Any, bool]]:
        with self.cond:
            return [m for m in self.messages if not ("/cmd/" in m[0] and not m[0].endswith("/res"))]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------- packages and config


# The key the test host signs commands with (agent_config sets it to the test's key).
COMMAND_KEY: list[Optional[Path]] = [None]


def keys(tmp: Path) -> tuple[Path, Path]:
    """The test host's key pair, where the host's default key lives when XDG_CONFIG_HOME=tmp/xdg
    (packages and commands are signed with it; the agent trusts it for both roles)."""
    from prune_pack.agent.keys import generate_keypair

    d = tmp / "xdg" / "prune-pack"
    if (d / "signing.key").exists():
        return d / "signing.key", d / "signing.pub"
    return generate_keypair(d)


def package(tmp: Path, version: int, signed: bool = True, name: str = "tiny", **manifest: Any) -> Path:
    from prune_pack.agent.writer import write_package

    priv, _ = keys(tmp)
    out = tmp / f"{name}-v{version}{'' if signed else '-unsigned'}.ppk"
    return write_package(TINY, {"name": name, "precision": "fp32", "version": version, **manifest}, out,
                         priv if signed else None)


def tampered(tmp: Path, pkg: Path) -> Path:
    """Same package with one byte of the stored model flipped (the zip CRC and the hash break)."""
    data = bytearray(pkg.read_bytes())
    i = data.find(b"images")  # inside model.onnx (stored, uncompressed)
    assert i > 0
    data[i] ^= 0x01
    out = tmp / f"tampered-{pkg.name}"
    out.write_bytes(bytes(data))
    return out


def agent_config(tmp: Path, broker: Any, **agent: Any) -> dict:
    pw = tmp / "device.pw"
    pw.write_text("device-secret\n")
    priv, pub = keys(tmp)
    COMMAND_KEY[0] = priv
    agent.setdefault("command_keys", [str(pub)])
    return {
        "device": {"id": DEV, "site": SITE},
        "mqtt": {"broker": broker.url if broker else None, "username": "device", "password_file": str(pw),
                 "reconnect_min_s": 1.0, "reconnect_max_s": 2.0, "keepalive_s": 5},
        "agent": {"state_dir": str(tmp / "state"), "telemetry_interval_s": 0.5, "trusted_keys": [str(pub)], **agent},
        "profile": {"runs": 5, "warmup": 1, "threads": 1},
        "inference": {"threads": 1},
    }


def sections(cfg: dict) -> Any:
    from prune_pack.config import parse_config

    return parse_config(yaml.safe_dump(cfg))


class InProcessDaemon:
    """The daemon in this process (its working loop in a thread): fast, for command tests."""

    def __init__(self, cfg: dict) -> None:
        from prune_pack.agent.daemon import Daemon

        self.daemon = Daemon.from_config(sections(cfg))
        self.daemon.start()
        self.thread = threading.Thread(target=self.daemon.run, kwargs={"install_signals": False}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


class DaemonProcess:
    """``python -m prune_pack.cli agent run --config FILE`` as a real process."""

    def __init__(self, tmp: Path, cfg: dict, env: Optional[dict] = None, tag: str = "") -> None:
        self.cfg_path = tmp / "agent.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.log = tmp / f"agent{tag}.log"
        e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "prune_pack.cli", "agent", "run", "--config", str(self.cfg_path)],
                                     env=e, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), cwd=str(tmp))

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def term(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class NotifySocket:
    """A real unix datagram socket standing in for systemd's $NOTIFY_SOCKET (abstract namespace)."""

    def __init__(self) -> None:
        self.name = f"prune-pack-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.received: list[str] = []

    @property
    def env(self) -> str:
        return "@" + self.name

    def collect_until(self, pred: Callable[[list[str]], bool], timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not pred(self.received):
            if time.monotonic() > deadline:
                raise AssertionError(f"notify messages so far: {self.received}")
            try:
                self.received.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
        return self.received

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- schema self-tests


def test_schemas_are_valid_and_reject_bad_messages() -> None:
    files = sorted(p.name for p in SCHEMA_DIR.glob("*.json"))
    assert {"envelope.json", "status.json", "telemetry.json", "cmd-result.json", "detections.json",
            "cmd-request.json"} <= set(files)
    env = {"schema": "status/1", "device_id": DEV, "site": SITE, "session": 1, "seq": 0, "ts_ms": 1}
    check_message(f"{BASE}/status", {**env, "state": "lost"})
    from jsonschema import ValidationError

    with pytest.raises(ValidationError):  # an unknown state
        check_message(f"{BASE}/status", {**env, "state": "sleeping"})
    with pytest.raises(ValidationError):  # online needs the model fields
        check_message(f"{BASE}/status", {**env, "state": "online"})
    res = {**env, "schema": "cmd-result/1", "seq": 3, "request_id": None, "cmd": "x", "ok": False,
           "error": {"reason": "bad_json", "detail": ""}}
    check_message(f"{BASE}/cmd/x/res", res)
    with pytest.raises(ValidationError):  # ok=false with a result
        check_message(f"{BASE}/cmd/x/res", {**res, "result": {}})
    with pytest.raises(ValidationError):  # unknown envelope field
        check_message(f"{BASE}/cmd/x/res", {**res, "extra": 1})
    with pytest.raises(ValidationError):  # missing envelope field
        check_message(f"{BASE}/cmd/x/res", {k: v for k, v in res.items() if k != "session"})
