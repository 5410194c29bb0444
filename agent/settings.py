"""Typed configuration sections of the device side.

The loader (``prune_pack.config``) validates a YAML file against these dataclasses and hands
each component its own section; components never see the raw dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar

S = TypeVar("S")


def merged(section: S, **flags: Any) -> S:
    """The one precedence rule: a flag wins over the config section, the section over its defaults.

    A flag left at ``None`` (argparse's "not given") keeps the section's value; every command, host
    or daemon, resolves its options through this, never with literal defaults of its own.
    """
    unknown = [k for k in flags if k not in {f.name for f in dataclasses.fields(section)}]  # type: ignore[arg-type]
    if unknown:
        raise TypeError(f"{type(section).__name__} has no field {unknown[0]!r}")
    return dataclasses.replace(section, **{k: v for k, v in flags.items() if v is not None})  # type: ignore[type-var]


@dataclass
class DeviceSection:
    id: str = "device-1"  # unique per device; part of every MQTT topic
    site: str = "default"  # groups devices on a dashboard; part of every MQTT topic


@dataclass
class TlsSection:
    ca: Optional[str] = None  # CA bundle that signed the broker's certificate
    cert: Optional[str] = None  # client certificate (mutual TLS), optional
    key: Optional[str] = None  # client key, with cert
    insecure: bool = False  # skip hostname verification (test brokers only)


@dataclass
class MqttSection:
    broker: Optional[str] = None  # mqtt://host:1883 or mqtts://host:8883; None = no MQTT
    prefix: str = "prunepack"  # topic root: {prefix}/{site}/{device_id}/...
    client_id: Optional[str] = None  # default: prune-pack-{device.id}
    username: Optional[str] = None
    password_file: Optional[str] = None  # read at start; never logged
    password_env: Optional[str] = None  # name of an environment variable holding the password
    tls: TlsSection = field(default_factory=TlsSection)
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0  # exponential backoff from here ...
    reconnect_max_s: float = 60.0  # ... up to here
    queue_max: int = 10000  # offline queue bound (messages); oldest dropped first


@dataclass
class ProfileSection:
    threads: int = 2  # ORT intra-op threads; 0 = ORT default (all cores)
    warmup: int = 10  # runs excluded from the statistics
    runs: int = 100  # measured runs (ignored when seconds is set)
    seconds: Optional[float] = None  # measure for this long instead of a fixed run count
    backend: Literal["ort", "openvino", "all"] = "ort"
    precision: Optional[str] = None  # None = the package's own precision


@dataclass
class InferenceSection:
    backend: Literal["ort", "openvino"] = "ort"
    precision: Optional[str] = None  # None = the package's own precision
    workers: int = 0  # inference workers; 0 = chosen from the core count
    threads: int = 0  # threads per worker; 0 = chosen from the core count
    conf: float = 0.25  # confidence threshold for detections
    iou: float = 0.7  # NMS IoU threshold (Ultralytics' default)
    max_det: int = 300


@dataclass
class StreamSection:
    name: str = ""  # used in topics and metrics: letters, digits, - and _
    source: str = ""  # video file, rtsp:// / http:// URL, or a V4L2 index like "0" or /dev/video0
    queue: int = 1  # frames buffered per stream; 1 = latest-frame policy
    loop: bool = True  # a video file restarts at its end (False: the stream stops)
    fps_limit: Optional[float] = None  # read at most this many frames per second
    publish_detections: bool = False  # send detections to {…}/detections/{name}
    detections_rate_hz: float = 2.0  # at most this many detection messages per second
    conf: Optional[float] = None  # per-stream override of inference.conf
    sink: Optional[str] = None  # JSON-lines file to append detections to
    retry_min_s: float = 1.0  # reopen backoff after a failure ...
    retry_max_s: float = 30.0  # ... up to here
    policy: Literal["latest", "block"] = "latest"  # full queue: drop the oldest frame, or (files) make the reader wait
    max_age_ms: Optional[float] = None  # frames older than this when a worker takes them are dropped as stale
    harvest: bool = False  # keep sample frames of this stream for recovery on the host (privacy: off by default)


@dataclass
class AgentSection:
    state_dir: str = "/var/lib/prune-pack"  # model store, offline queue, session counter, caches
    telemetry_interval_s: float = 10.0
    trusted_keys: list[str] = field(default_factory=list)  # Ed25519 public key files (PEM)
    revoked_keys: list[str] = field(default_factory=list)  # wins over trusted_keys
    max_package_mb: float = 512.0  # packages or members over this are rejected
    max_inline_mb: float = 16.0  # base64 packages inside an MQTT command
    max_payload_kb: float = 22528.0  # any larger command payload is refused (16 MiB inline as base64 + 1 MiB)
    allow_unsigned: bool = False  # host CLI only (profile/verify); the agent daemon always refuses unsigned packages
    fetch_allowed_hosts: list[str] = field(default_factory=list)  # url deploys: host or host:port; none by default
    fetch_timeout_s: float = 300.0  # one deadline for a whole download
    command_keys: list[str] = field(default_factory=list)  # Ed25519 public keys (PEM) allowed to sign commands
    allow_unsigned_commands: bool = False  # test benches only: accept deploy/activate/rollback/profile-of-a-file unsigned
    min_free_mb: float = 64.0  # less free space in state_dir marks the agent degraded in telemetry
    max_version_jump: int = 1000  # a package more versions than this above the highest installed is refused
    watchdog: bool = True  # send systemd WATCHDOG=1 from the working loop when NOTIFY_SOCKET is set
    # HOST:PORT of this agent's own Prometheus /metrics (sites that scrape devices directly); None = off.
    # Needs prometheus-client: pip install 'prune-pack[metrics]'
    metrics_listen: Optional[str] = None


@dataclass
class HarvestSection:
    """The on-device pool of harvested frames (agent.harvest); streams opt in with ``harvest: true``."""

    dir: Optional[str] = None  # pool folder; None = {agent.state_dir}/harvest
    interval_s: float = 5.0  # per stream: at most one candidate frame every this many seconds
    max_frames: int = 2000  # pool quota (count); the least useful frame is evicted first
    max_mb: float = 512.0  # pool quota (JPEG + sidecar bytes)
    min_free_mb: float = 1024.0  # free-disk floor: below it harvesting pauses
    dedup_fraction: float = 0.01  # near-duplicate: under this share of 32x32 thumbnail cells changed (measured: noise 0, a moved person >= 0.015)
    uncertain_below: float = 0.5  # a detection under this confidence makes a frame's sidecar say why: "uncertain"
    jpeg_quality: int = 90
    queue: int = 4  # frames waiting for the writer thread; more are dropped (counted), inference never waits
    retry_s: float = 30.0  # a paused pool (full/read-only disk) retries after this long
    chunk_kb: int = 128  # frames-read answers carry at most this much of a file
    pull_kbps: float = 1024.0  # frames-read answers at most this many KiB/s (telemetry and commands come first)


@dataclass
class HomeAssistantSection:
    discovery: bool = False  # publish Home Assistant MQTT discovery for this agent (opt-in; docs/mqtt.md)
    prefix: str = "homeassistant"  # Home Assistant's discovery prefix (its MQTT integration's discovery_prefix)
