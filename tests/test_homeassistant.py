"""A real Home Assistant (``.venv-ha``, made by ``.ci/home-assistant.sh``) against a real agent process
over the real Mosquitto, with the ACL docs/mqtt.md gives Home Assistant's user: the agent's one
device-discovery message makes the device's entities appear, they show what the agent reported, and
they turn unavailable after ``SIGKILL`` of the agent (its Last Will).

Home Assistant's states are read back over MQTT through its own ``mqtt_statestream`` integration,
so the test needs no login or HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

import paho.mqtt.client as paho
import pytest
import yaml

from conftest import ON_CI, REPO, free_port
from fleet_helpers import deploy, device_config, target_package, wait_until
from test_mqtt_helpers import DaemonProcess, Watcher

SITE, DEV = "line.3", "pc 7"  # both need sanitising for Home Assistant
BASE = f"prunepack/{SITE}/{DEV}"
HA_VENV = Path(os.environ.get("PRUNE_PACK_HA_VENV", REPO / ".venv-ha"))
STATES = "hastate"  # mqtt_statestream's base topic


@pytest.fixture
def hass_exe() -> Path:
    exe = HA_VENV / "bin" / "hass"
    if not exe.exists():
        if ON_CI:
            pytest.fail(f"{exe} is missing (.ci/run must run .ci/home-assistant.sh)")
        pytest.skip(f"no Home Assistant in {HA_VENV}: run bash .ci/home-assistant.sh")
    return exe


class HomeAssistant:
    """``hass`` with a config dir written here: the MQTT integration's config entry (what its
    config flow would store) pointed at the test broker as user ``hass``, and mqtt_statestream."""

    def __init__(self, exe: Path, root: Path, broker: Any) -> None:
        self.exe, self.root = exe, root
        root.mkdir()
        (root / ".storage").mkdir()
        (root / "configuration.yaml").write_text(yaml.safe_dump({
            "homeassistant": {"name": "prune-pack test", "latitude": 0.0, "longitude": 0.0, "elevation": 0,
                              "unit_system": "metric", "time_zone": "UTC", "currency": "EUR", "country": "DE"},
            "http": {"server_host": "127.0.0.1", "server_port": free_port()},
            "logger": {"default": "warning"},
            "mqtt_statestream": {"base_topic": STATES, "publish_attributes": True},
        }))
        entry = {"entry_id": "01PRUNEPACKTESTMQTTENTRY00", "version": 1, "minor_version": 1, "domain": "mqtt",
                 "title": "test broker", "source": "user", "unique_id": None, "options": {},
                 "data": {"broker": broker.host, "port": broker.port, "username": "hass",
                          "password": broker.users["hass"], "discovery": True, "discovery_prefix": "homeassistant"}}
        (root / ".storage" / "core.config_entries").write_text(json.dumps(
            {"version": 1, "minor_version": 1, "key": "core.config_entries", "data": {"entries": [entry]}}))
        self.log = root / "home-assistant.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        # --skip-pip: everything it needs is in its venv; nothing is fetched at run time
        self.proc = subprocess.Popen([str(self.exe), "-c", str(self.root), "--skip-pip", "--log-file", str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class States:
    """Home Assistant's entity states as mqtt_statestream publishes them: ``{entity_id: state}``
    plus attributes (``{entity_id: {attribute: value}}``)."""

    def __init__(self, broker: Any) -> None:
        self.state: dict[str, str] = {}
        self.attrs: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="test-statestream")
        self.client.username_pw_set("hass", broker.users["hass"])
        self.client.on_message = self._on_message
        self.births: list[str] = []  # Home Assistant's own status (birth / will), written as user hass
        self.client.on_connect = lambda c, *a: c.subscribe([(f"{STATES}/#", 1), ("homeassistant/status", 1)])
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == "homeassistant/status":
            self.births.append(msg.payload.decode())
            return
        m = re.fullmatch(rf"{STATES}/(\w+)/(\w+)/(\w+)", msg.topic)
        if not m:
            return
        entity, key = f"{m[1]}.{m[2]}", m[3]
        value = msg.payload.decode()
        with self.lock:
            if key == "state":
                self.state[entity] = value
            else:
                self.attrs.setdefault(entity, {})[key] = json.loads(value) if value else None

    def find(self, suffix: str) -> Optional[str]:
        """The one entity whose id ends with ``suffix``."""
        with self.lock:
            hits = [e for e in self.state if e.endswith(suffix)]
        assert len(hits) <= 1, hits
        return hits[0] if hits else None

    def get(self, entity: str) -> Optional[str]:
        with self.lock:
            return self.state.get(entity)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def reported_p95(seen: Watcher) -> set[float]:
    """Every cam1 p95 the agent published in its telemetry."""
    return {s["latency_ms"]["p95"] for t, b, _ in seen.device_messages() if t == f"{BASE}/telemetry"
            for s in b["streams"] if s["stream"] == "cam1" and s["latency_ms"]["p95"] is not None}


def test_real_home_assistant_shows_the_agent_and_its_last_will(broker, tmp_path, hass_exe):
    cfg = device_config(tmp_path, broker, SITE, DEV, keepalive_s=5)
    cfg["homeassistant"] = {"discovery": True}
    seen = Watcher(broker)  # what the agent really published
    states = States(broker)
    ha = HomeAssistant(hass_exe, tmp_path / "ha", broker)
    agent = DaemonProcess(tmp_path, cfg)
    try:
        seen.wait_for(lambda t, b: t == f"{BASE}/status" and b.get("state") == "online", 60)
        deploy(broker, tmp_path, SITE, DEV, target_package(tmp_path, 1))  # a model: streams run, telemetry flows
        ha.start()  # after the agent: the retained discovery message, then the republish on its birth message

        dev = "line_3_pc_7"  # Home Assistant's slug of the device name "prune-pack line.3/pc 7"
        wait_until(lambda: states.find(f"{dev}_cam1_p95_latency") or ha.proc.poll() is not None, 180, "the p95 entity in Home Assistant")
        assert ha.proc.poll() is None, ha.tail()
        p95 = states.find(f"{dev}_cam1_p95_latency")
        for suffix in ("cam1_fps", "cam1_dropped_frames", "cpu", "memory", "model"):
            assert states.find(f"{dev}_{suffix}"), (suffix, sorted(states.state))
        model = states.find(f"{dev}_model")
        assert model.startswith("update.")

        # the values are the agent's own: the p95 Home Assistant shows is one the agent reported
        def shown_p95_was_reported() -> bool:
            v = states.get(p95)
            return v not in (None, "unknown", "unavailable") and float(v) in reported_p95(seen)

        wait_until(shown_p95_was_reported, 60, "Home Assistant showing a p95 the agent reported")
        wait_until(lambda: states.attrs.get(model, {}).get("installed_version") == "tiny v1", 30,
                   f"the update entity's installed version: {states.attrs.get(model)}")
        assert states.get(model) == "off"  # up to date: the fleet tools decide what is latest
        # its birth message goes through the ACL (the agent republishes discovery on it)
        wait_until(lambda: "online" in states.births, 60, "Home Assistant's birth message")

        # SIGKILL: the broker publishes the agent's Last Will; every entity turns unavailable
        entities = [states.find(f"{dev}_{s}") for s in ("cam1_p95_latency", "cam1_fps", "cpu", "model")]
        before = {e: states.get(e) for e in entities}
        assert "unavailable" not in before.values() and None not in before.values(), before
        agent.kill9()
        killed = time.monotonic()
        wait_until(lambda: all(states.get(e) == "unavailable" for e in entities), 60,
                   f"entities unavailable after SIGKILL: {[(e, states.get(e)) for e in entities]}")
        print(f"Home Assistant: entities {sorted(states.state)}, {before}; unavailable {time.monotonic() - killed:.1f} s "
              "after SIGKILL (keepalive 5 s)")
    finally:
        agent.ensure_dead()
        ha.stop()
        states.close()
        seen.close()
    assert ha.proc.returncode == 0, ha.tail()
    assert not seen.invalid, seen.invalid
