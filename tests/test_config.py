"""The one configuration schema: errors name the key, the expected type and the line."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from prune_pack.config import Config, load_config, parse_config
from prune_pack.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_example_config_is_valid_and_complete():
    cfg = load_config(REPO / "config.example.yaml")
    assert cfg.device.id == "cell-07" and cfg.mqtt.broker == "mqtt://127.0.0.1:1883"
    # Docs match code: every schema key appears in the commented example.
    text = (REPO / "config.example.yaml").read_text()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = typing.get_type_hints(cls)[f.name]
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            yield f.name
            if dataclasses.is_dataclass(inner):
                yield from keys(inner)

    missing = [k for k in keys(Config) if not re.search(rf"^\s*#?\s*(- )?{k}:", text, re.M)]
    assert not missing, f"config.example.yaml does not document: {missing}"


@pytest.mark.parametrize(
    "text, key, line, fragment",
    [
        ("mqtt:\n  keepalive_s: fast\n", "mqtt.keepalive_s", 2, "expected integer"),
        ("agent:\n  telemetry_interval_s: [1]\n", "agent.telemetry_interval_s", 2, "expected number"),
        ("agent:\n  allow_unsigned: 'yes'\n", "agent.allow_unsigned", 2, "expected boolean"),
        ("profile:\n  backend: tensorrt\n", "profile.backend", 2, "one of 'ort', 'openvino', 'all'"),
        ("device:\n  id: cam\n\nagent:\n  stat_dir: /tmp\n", "agent.stat_dir", 5, "unknown key"),
        ("colour: blue\n", "colour", 1, "unknown key"),
        ("streams:\n  - name: a\n    source: a.mp4\n  - name: b\n    sauce: b.mp4\n", "streams[1].sauce", 5, "unknown key"),
        ("streams:\n  - name: a\n    source: a.mp4\n    queue: 0\n", "streams[0].queue", 4, ">= 1"),
        ("mqtt:\n  broker: tcp://x:1883\n", "mqtt.broker", 2, "mqtt://"),
        ("device:\n  id: a/b\n", "device.id", 2, "no '/'"),
        ("mqtt: 5\n", "mqtt", 1, "expected mapping"),
        # a union without null must not say "or null"
        ("prune:\n  recalibrate_bn: maybe\n", "prune.recalibrate_bn", 2, "expected boolean or one of 'auto', got"),
    ],
)
def test_bad_config_names_key_type_and_line(text, key, line, fragment):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "cfg.yaml")
    msg = str(e.value)
    assert msg.startswith(f"cfg.yaml:{line}: {key}: "), msg
    assert fragment in msg
    assert "\n" not in msg


def test_yaml_syntax_error_has_line():
    with pytest.raises(ConfigError, match=r"cfg.yaml:3: not valid YAML"):
        parse_config("a:\n  - b\n c: d\n", "cfg.yaml")


def test_defaults_and_nested_types():
    cfg = parse_config("streams:\n  - name: cam1\n    source: 0\n    conf: 1\nmqtt:\n  tls:\n    insecure: true\n")
    assert cfg.streams[0].source == "0"  # a V4L2 index stays a string
    assert cfg.streams[0].conf == 1.0 and isinstance(cfg.streams[0].conf, float)
    assert cfg.mqtt.tls.insecure is True and cfg.mqtt.prefix == "prunepack"
    assert parse_config("") == parse_config("{}")
    assert load_config(None).build.percentile == "p95"


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/prune-pack.yaml")
