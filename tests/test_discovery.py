"""Home Assistant MQTT discovery from a real agent over the real Mosquitto (with the ACL lines
docs/mqtt.md asks for): the retained device-discovery message, its ids, and every entity's
template rendered (Jinja, with Home Assistant's ``to_json``) against the messages the agent
really sent; republished on reconnect, model switch and Home Assistant's birth message."""

from __future__ import annotations

import json
import re

import jinja2
import paho.mqtt.client as paho

from fleet_helpers import deploy, device_config, target_package, wait_until
from test_mqtt_helpers import InProcessDaemon, Watcher

from prune_pack.agent.discovery import discovery_payload, object_id, sanitize

SITE, DEV = "lab.3", "dev 1"  # both need sanitising for Home Assistant
OID = "prunepack_lab_3_dev_1"
CONFIG = f"homeassistant/device/{OID}/config"
BASE = f"prunepack/{SITE}/{DEV}"


def render(template: str, body: dict) -> str:
    """A value template as Home Assistant renders it (``value_json``; its ``to_json`` filter)."""
    env = jinja2.Environment()
    env.filters["to_json"] = json.dumps
    return env.from_string(template).render(value_json=body, value=json.dumps(body))


class HomeAssistantClient(Watcher):
    """Stands in for Home Assistant's MQTT side: reads discovery and the agent's topics, sends its birth."""

    def __init__(self, broker) -> None:
        super().__init__(broker, user="host", topic="#")

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic.startswith("prunepack/"):
            return super()._on_message(client, userdata, msg)  # the agent's own messages: schema-checked
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = msg.payload
        with self.cond:
            self.messages.append((msg.topic, body, bool(msg.retain)))
            self.cond.notify_all()

    def configs(self, start: int = 0) -> list[dict]:
        with self.cond:
            return [b for t, b, _ in self.messages[start:] if t == CONFIG]

    def birth(self) -> None:
        self.client.publish("homeassistant/status", "online", qos=1).wait_for_publish(5)


def test_ids_are_sanitised():
    assert sanitize("lab.3/dev 1+#") == "lab_3_dev_1__"
    assert object_id("prunepack", SITE, DEV) == OID
    topic, payload = discovery_payload(_Topics(), ["cam-1", "cam 2"], None)
    assert topic == f"homeassistant/device/{OID}/config"
    ids = [c["unique_id"] for c in payload["cmps"].values()]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    assert {"cam-1_p95", "cam_2_fps", "cam_2_drops"} <= set(payload["cmps"])


class _Topics:
    prefix, site, device_id = "prunepack", SITE, DEV
    base = f"prunepack/{SITE}/{DEV}"
    status, telemetry = f"{base}/status", f"{base}/telemetry"


def test_home_assistant_discovery_from_a_real_agent(broker, tmp_path):
    cfg = device_config(tmp_path, broker, SITE, DEV)
    cfg["homeassistant"] = {"discovery": True}
    ha = HomeAssistantClient(broker)
    d = InProcessDaemon(cfg)
    try:
        wait_until(lambda: ha.configs(), 20, "the discovery message")
        first = ha.configs()[-1]
        assert first["dev"]["ids"] == [OID] and "hw" not in first["dev"]  # no model yet
        assert {c["unique_id"] for c in first["cmps"].values()} == {
            f"{OID}_{k}" for k in ("cpu", "rss", "model", "cam1_p95", "cam1_fps", "cam1_drops")}
        (avail,) = first["availability"]
        assert avail["topic"] == f"{BASE}/status"

        deploy(broker, tmp_path, SITE, DEV, target_package(tmp_path, 1))  # model switch: republished
        wait_until(lambda: any("tiny v1" in c["dev"].get("hw", "") for c in ha.configs()), 20, "the model in discovery")

        # retained: a Home Assistant that starts later gets it from the broker at once
        late = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="late-ha")
        late.username_pw_set("host", broker.users["host"])
        got: list = []
        late.on_message = lambda c, u, m: got.append((m.topic, m.retain, json.loads(m.payload)))
        late.connect(broker.host, broker.port)
        late.subscribe(CONFIG, 1)
        late.loop_start()
        wait_until(lambda: got, 10, "the retained discovery message")
        late.disconnect()
        late.loop_stop()
        assert got[0][1] is True and "tiny v1" in got[0][2]["dev"]["hw"]

        # every entity's template against what the agent really publishes
        tel = ha.wait_for(lambda t, b: t == f"{BASE}/telemetry" and b["streams"] and b["streams"][0]["frames_processed"] >= 3)[1]
        status = ha.wait_for(lambda t, b: t == f"{BASE}/status" and b.get("model"))[1]
        cmps = ha.configs()[-1]["cmps"]
        cam = tel["streams"][0]
        assert float(render(cmps["cam1_p95"]["value_template"], tel)) == cam["latency_ms"]["p95"]
        assert float(render(cmps["cam1_fps"]["value_template"], tel)) == cam["processed_fps"]
        assert int(render(cmps["cam1_drops"]["value_template"], tel)) == cam["frames_dropped"]
        assert float(render(cmps["cpu"]["value_template"], tel)) == tel["cpu_percent"]
        assert float(render(cmps["rss"]["value_template"], tel)) == tel["rss_mb"]
        assert render(cmps["cam1_p95"]["value_template"], {**tel, "streams": []}) == "None"  # HA: unknown
        upd = json.loads(render(cmps["model"]["value_template"], status))
        assert upd == {"installed_version": "tiny v1", "latest_version": "tiny v1", "title": "tiny"}
        assert json.loads(render(cmps["model"]["value_template"], {"state": "lost"}))["installed_version"] is None
        for state, want in (("online", "online"), ("offline", "offline"), ("lost", "offline")):
            assert render(avail["value_template"], {"state": state}) == want

        # Home Assistant's birth message (it restarted): republished
        n = len(ha.configs())
        ha.birth()
        wait_until(lambda: len(ha.configs()) > n, 10, "discovery after Home Assistant's birth message")

        # reconnect (broker restart): republished
        mark = ha.mark()
        broker.restart()
        ha.reconnect()
        wait_until(lambda: ha.configs(mark), 30, "discovery after the agent reconnected")
    finally:
        d.stop()
        ha.close()
    assert not ha.invalid, ha.invalid


def test_discovery_is_opt_in(broker, tmp_path):
    cfg = device_config(tmp_path, broker, SITE, DEV)
    cfg["streams"] = []
    ha = HomeAssistantClient(broker)
    d = InProcessDaemon(cfg)
    try:
        ha.wait_for(lambda t, b: t == f"{BASE}/status" and b.get("state") == "online")
        ha.birth()
        ha.wait_for(lambda t, b: t == f"{BASE}/telemetry")  # the agent is working ...
        assert ha.configs() == [] and d.daemon.discovery is None  # ... and publishes no discovery
    finally:
        d.stop()
        ha.close()
