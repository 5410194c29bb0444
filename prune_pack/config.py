"""One configuration schema for host and device, validated in one place.

The schema is the dataclasses in ``agent/settings.py`` (device) and ``deploy/settings.py``
(host). ``load_config`` parses YAML, checks every key against them (unknown keys are errors)
and returns a typed ``Config``; an error names the key path, the expected type and the line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from prune_pack.agent.settings import (
    AgentSection,
    DeviceSection,
    HarvestSection,
    HomeAssistantSection,
    InferenceSection,
    MqttSection,
    ProfileSection,
    StreamSection,
)
from prune_pack.deploy.settings import (
    BuildSection,
    DashboardSection,
    ExporterSection,
    ExportSection,
    FinetuneSection,
    PruneSection,
    RolloutSection,
)
from prune_pack.errors import ConfigError


@dataclass
class Config:
    device: DeviceSection = field(default_factory=DeviceSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    agent: AgentSection = field(default_factory=AgentSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    streams: list[StreamSection] = field(default_factory=list)
    harvest: HarvestSection = field(default_factory=HarvestSection)
    homeassistant: HomeAssistantSection = field(default_factory=HomeAssistantSection)
    prune: PruneSection = field(default_factory=PruneSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    export: ExportSection = field(default_factory=ExportSection)
    build: BuildSection = field(default_factory=BuildSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    exporter: ExporterSection = field(default_factory=ExporterSection)
    dashboard: DashboardSection = field(default_factory=DashboardSection)
    origin: Optional[str] = field(default=None, metadata={"internal": True})  # the file it came from


def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path of a composed YAML tree to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            p = path + (k.value,)
            out[p] = k.start_mark.line + 1
            _lines(v, p, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _lines(v, path + (i,), out)
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))


class _Validator:
    def __init__(self, lines: dict[tuple, int], source: str) -> None:
        self.lines = lines
        self.source = source

    def fail(self, path: tuple, msg: str) -> None:
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")
        line = self.lines.get(path)
        # The innermost known line: list items and missing keys fall back to their parent.
        p = path
        while line is None and p:
            p = p[:-1]
            line = self.lines.get(p)
        where = f"{self.source}:{line}" if line else self.source
        raise ConfigError(f"{where}: {key or '<top>'}: {msg}")

    def value(self, tp: Any, v: Any, path: tuple) -> Any:
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if v is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1:
                if v is None:
                    self.fail(path, f"expected {_type_name(tp)}, got null")
                return self.value(inner[0], v, path)
            for a in inner:
                try:
                    return self.value(a, v, path)
                except ConfigError:
                    continue
            self.fail(path, f"expected {_type_name(tp)}, got {type(v).__name__} {v!r}")
        if origin is Literal:
            if v not in typing.get_args(tp):
                self.fail(path, f"expected {_type_name(tp)}, got {v!r}")
            return v
        if origin is list:
            if not isinstance(v, list):
                self.fail(path, f"expected {_type_name(tp)}, got {type(v).__name__}")
            (item,) = typing.get_args(tp)
            return [self.value(item, x, path + (i,)) for i, x in enumerate(v)]
        if dataclasses.is_dataclass(tp):
            return self.section(tp, v, path)
        if tp is bool:
            if not isinstance(v, bool):
                self.fail(path, f"expected boolean, got {type(v).__name__} {v!r}")
            return v
        if tp is int:
            if isinstance(v, bool) or not isinstance(v, int):
                self.fail(path, f"expected integer, got {type(v).__name__} {v!r}")
            return v
        if tp is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.fail(path, f"expected number, got {type(v).__name__} {v!r}")
            return float(v)
        if tp is str:
            # YAML turns 0 or 1883 into ints; a string field accepts scalars but not mappings/lists.
            if isinstance(v, (dict, list)) or v is None:
                self.fail(path, f"expected string, got {type(v).__name__}")
            return str(v)
        raise TypeError(f"unsupported schema type {tp!r}")  # a bug in the schema, not the file

    def section(self, cls: type, raw: Any, path: tuple) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail(path, f"expected mapping, got {type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        kwargs = {}
        for k, v in raw.items():
            if k not in fields:
                known = ", ".join(sorted(fields))
                self.fail(path + (k,), f"unknown key (expected one of: {known})")
            kwargs[k] = self.value(hints[k], v, path + (k,))
        return cls(**kwargs)


def _read_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}{line}: not valid YAML: {problem}") from None
    return data, (_lines(node) if node is not None else {})


def parse_config(text: str, source: str = "<config>") -> Config:
    data, lines = _read_yaml(text, source)
    cfg = _Validator(lines, source).section(Config, data, ())
    _check_semantics(cfg, _Validator(lines, source))
    cfg.origin = source
    return cfg


def load_config(path: str | Path | None) -> Config:
    """Load and validate a config file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    return parse_config(text, str(p))


def _check_semantics(cfg: Config, v: _Validator) -> None:
    """Range and cross-field checks that a type alone cannot express."""
    positive = [
        (("agent", "telemetry_interval_s"), cfg.agent.telemetry_interval_s),
        (("agent", "max_package_mb"), cfg.agent.max_package_mb),
        (("mqtt", "keepalive_s"), cfg.mqtt.keepalive_s),
        (("mqtt", "queue_max"), cfg.mqtt.queue_max),
        (("profile", "runs"), cfg.profile.runs),
        (("build", "imgsz"), cfg.build.imgsz),
        (("export", "imgsz"), cfg.export.imgsz),
    ]
    for path, val in positive:
        if val <= 0:
            v.fail(path, f"must be > 0, got {val}")
    nonneg = [
        (("profile", "threads"), cfg.profile.threads),
        (("profile", "warmup"), cfg.profile.warmup),
        (("inference", "workers"), cfg.inference.workers),
        (("inference", "threads"), cfg.inference.threads),
        (("build", "threads"), cfg.build.threads),
        (("finetune", "epochs"), cfg.finetune.epochs),
        (("build", "imgsz_steps"), cfg.build.imgsz_steps),
    ]
    for path, val in nonneg:
        if val < 0:
            v.fail(path, f"must be >= 0, got {val}")
    if cfg.mqtt.reconnect_min_s <= 0 or cfg.mqtt.reconnect_max_s < cfg.mqtt.reconnect_min_s:
        v.fail(("mqtt", "reconnect_max_s"), "needs 0 < reconnect_min_s <= reconnect_max_s")
    if cfg.mqtt.broker is not None and not cfg.mqtt.broker.startswith(("mqtt://", "mqtts://")):
        v.fail(("mqtt", "broker"), f"expected a URL like mqtt://host:1883 or mqtts://host:8883, got {cfg.mqtt.broker!r}")
    for path, val in [(("inference", "conf"), cfg.inference.conf), (("inference", "iou"), cfg.inference.iou)]:
        if not 0.0 <= val <= 1.0:
            v.fail(path, f"must be within [0, 1], got {val}")
    if cfg.export.int8_calib_images is not None and cfg.export.int8_calib_images < 1:
        v.fail(("export", "int8_calib_images"), f"must be >= 1 (or null for the engine's default), got {cfg.export.int8_calib_images}")
    if not 0.0 < cfg.build.max_ratio < 1.0:
        v.fail(("build", "max_ratio"), f"must be within (0, 1), got {cfg.build.max_ratio}")
    if not 0.0 < cfg.prune.max_layer_ratio < 1.0:
        v.fail(("prune", "max_layer_ratio"), f"must be within (0, 1), got {cfg.prune.max_layer_ratio}")
    names = set()
    for i, s in enumerate(cfg.streams):
        if not s.name or not all(c.isalnum() or c in "-_" for c in s.name):
            v.fail(("streams", i, "name"), f"must be non-empty letters, digits, '-' or '_', got {s.name!r}")
        if s.name in names:
            v.fail(("streams", i, "name"), f"duplicate stream name {s.name!r}")
        names.add(s.name)
        if not s.source:
            v.fail(("streams", i, "source"), "is required")
        if s.queue < 1:
            v.fail(("streams", i, "queue"), f"must be >= 1, got {s.queue}")
    for key, val in (("id", cfg.device.id), ("site", cfg.device.site)):
        # These become MQTT topic levels: wildcards or separators would break subscriptions.
        if not val or any(c in val for c in "/+#") or val != val.strip():
            v.fail(("device", key), f"must be non-empty and contain no '/', '+' or '#', got {val!r}")
