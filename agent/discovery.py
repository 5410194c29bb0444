"""Home Assistant MQTT discovery for the agent (opt-in: ``homeassistant.discovery: true``).

One retained device-discovery message per agent on
``{discovery_prefix}/device/{object_id}/config`` (Home Assistant's device-based discovery, 2024.11+):
the device (agent version, active model), and its entities, all reading the agent's existing
topics, so nothing else is published:

- availability from ``{prefix}/{site}/{id}/status`` (``online`` -> available; ``offline``/``lost`` -> not),
- per stream: p95 latency, fps, dropped frames (from ``telemetry``; streams are a list, selected by name),
- agent CPU and RSS (from ``telemetry``),
- an ``update`` entity whose installed version is the active model and version (from ``status``).

Published on every (re)connect, after every model switch, and whenever Home Assistant's birth
message (``{discovery_prefix}/status`` = ``online``) arrives, i.e. after Home Assistant restarts.
The ACL lines this needs are in docs/mqtt.md ("Home Assistant").
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Optional

from prune_pack import __version__

log = logging.getLogger("prune_pack.agent.discovery")

ORIGIN = {"name": "prune-pack", "sw": __version__, "url": "https://github.com/prune-pack/prune-pack"}


def sanitize(text: str) -> str:
    """An id Home Assistant accepts in topics and unique ids: ``[a-zA-Z0-9_-]``, everything else ``_``."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", text) or "_"


def object_id(prefix: str, site: str, device_id: str) -> str:
    return sanitize(f"{prefix}_{site}_{device_id}")


def _stream_value(stream: str, attribute: str) -> str:
    """A template for one stream's field of telemetry/2; ``None`` (HA: unknown) when it is absent."""
    return ("{{ value_json.streams | selectattr('stream', 'equalto', " + json.dumps(stream) + ")"
            " | map(attribute='" + attribute + "') | first | default(None) }}")


def discovery_payload(topics: Any, streams: list[str], model: Optional[dict], ha_prefix: str = "homeassistant"
                      ) -> tuple[str, dict]:
    """(config topic, payload) of one agent's device discovery message.

    ``topics`` is the agent's ``agent.mqtt.Topics``; ``model`` the status' model info or None.
    """
    oid = object_id(topics.prefix, topics.site, topics.device_id)
    name = f"{topics.site}/{topics.device_id}"
    dev: dict[str, Any] = {"ids": [oid], "name": f"prune-pack {name}", "mf": "prune-pack",
                           "mdl": "prune-pack agent", "sw": __version__}
    if model:
        dev["hw"] = f"{model.get('name')} v{model.get('version')} {model.get('precision')}"
    tel = topics.telemetry
    cmps: dict[str, dict] = {
        "cpu": {"p": "sensor", "name": "CPU", "state_topic": tel, "unit_of_measurement": "%",
                "state_class": "measurement", "value_template": "{{ value_json.cpu_percent }}",
                "entity_category": "diagnostic"},
        "rss": {"p": "sensor", "name": "Memory", "state_topic": tel, "unit_of_measurement": "MiB",
                "device_class": "data_size", "state_class": "measurement", "value_template": "{{ value_json.rss_mb }}",
                "entity_category": "diagnostic"},
        "model": {"p": "update", "name": "Model", "state_topic": topics.status,
                  # the installed model as the update entity's version; the fleet tools decide what is
                  # latest, so latest = installed (Home Assistant shows "up to date" with the model name)
                  "value_template": "{% set m = value_json.model %}{{ {'installed_version': "
                                    "(m.name ~ ' v' ~ m.version) if m else None, 'latest_version': "
                                    "(m.name ~ ' v' ~ m.version) if m else None, 'title': m.name if m else None} "
                                    "| to_json }}"},
    }
    for s in streams:
        sid = sanitize(s)
        cmps[f"{sid}_p95"] = {"p": "sensor", "name": f"{s} p95 latency", "state_topic": tel,
                              "unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
                              "value_template": _stream_value(s, "latency_ms.p95")}
        cmps[f"{sid}_fps"] = {"p": "sensor", "name": f"{s} fps", "state_topic": tel, "unit_of_measurement": "fps",
                              "state_class": "measurement", "value_template": _stream_value(s, "processed_fps")}
        cmps[f"{sid}_drops"] = {"p": "sensor", "name": f"{s} dropped frames", "state_topic": tel,
                                "state_class": "total_increasing", "value_template": _stream_value(s, "frames_dropped")}
    for key, c in cmps.items():
        c["unique_id"] = f"{oid}_{key}"
    payload = {
        "dev": dev, "o": ORIGIN, "cmps": cmps, "qos": 0,
        "availability": [{"topic": topics.status, "payload_available": "online", "payload_not_available": "offline",
                          "value_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}"}],
    }
    return f"{ha_prefix}/device/{oid}/config", payload


class Discovery:
    """Publishes the discovery message through an ``agent.mqtt.MqttLink`` at the right moments."""

    def __init__(self, link: Any, ha_prefix: str, streams: list[str], model: Callable[[], Optional[dict]]) -> None:
        self.link, self.ha_prefix, self.streams, self.model = link, ha_prefix, list(streams), model
        self.published = 0
        link.add_subscription(f"{ha_prefix}/status", self._on_birth)  # Home Assistant's birth / last will
        link.add_connected_hook(self.publish)

    def publish(self) -> None:
        link = self.link
        if not (link.enabled and link.connected):
            return  # the next connect publishes it
        topic, payload = discovery_payload(link.topics, self.streams, self.model(), self.ha_prefix)
        link.client.publish(topic, json.dumps(payload, separators=(",", ":")), qos=1, retain=True)
        self.published += 1

    def _on_birth(self, payload: bytes) -> None:
        if payload.strip() == b"online":
            log.info("Home Assistant came online; republishing discovery")
            self.publish()
