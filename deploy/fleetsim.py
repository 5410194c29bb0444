"""A simulated fleet for the rollout tests and benchmark: many REAL agents in one process.

Each simulated device is ``agent.daemon.Daemon`` itself (its MQTT link, Last Will, outbox,
command parsing and lanes, package verification, model store, status and telemetry code) with
only inference stubbed: ``SimDaemon`` overrides the three methods that touch a runtime (``_load``,
``_profile``, ``_start_streams``) and reports the latency of its simulated PC model instead
(``_answer`` is wrapped only to count the deploy/rollback requests a device receives).
Telemetry is sent by one thread per process for all its devices (the daemon's own working loop
would cost a thread each, and adds only the systemd watchdog).

``python -m prune_pack.deploy.fleetsim SPEC.json`` runs one fleet process until SIGTERM (the
benchmark starts several); tests use ``SimFleet`` in-process.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from prune_pack.agent.daemon import Daemon
from prune_pack.agent.settings import (
    AgentSection,
    DeviceSection,
    InferenceSection,
    MqttSection,
    ProfileSection,
    StreamSection,
)

DEPLOYS = "sim-deploys.jsonl"  # per device: one line per deploy/rollback request it received


@dataclasses.dataclass
class PcModel:
    name: str
    latency_ms: float  # the p95 this PC model reaches (streams and profile alike)
    streams: int = 1  # 0: no streams, the rollout gates on the deploy's profile
    stream_errors: bool = False  # streams count a new error on every report (a crashing pipeline)


class _StubSession:
    backend = "sim"

    def __init__(self, model_path: Path) -> None:
        self.path = model_path


class _StubStreams:
    """The metrics a StreamManager reports, at the PC model's latency."""

    def __init__(self, d: "SimDaemon") -> None:
        self.d, self.swaps, self.started = d, 0, time.monotonic()
        self.model_path = d.store.active.model_path if d.store.active else None
        self.errors = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def swap(self, path: Any, names: Any = None) -> None:
        self.model_path, self.swaps, self.errors = path, self.swaps + 1, 0

    def metrics(self) -> dict:
        ms = self.d.pc.latency_ms
        if self.d.pc.stream_errors:
            self.errors += 1
        up = round(time.monotonic() - self.started, 1)
        n = int(up * 10)  # frames at a simulated 10 fps
        streams = {f"cam{i}": {"state": "running", "reason": None, "source": "sim", "frames_read": n,
                               "frames_processed": n, "frames_dropped": 0,
                               "latency_ms": {"p50": round(ms * 0.9, 2), "p95": round(ms, 2), "p99": round(ms * 1.1, 2)},
                               "errors": self.errors, "last_error": "sim" if self.errors else None}
                   for i in range(self.d.pc.streams)}
        return {"streams": streams, "workers": 1, "threads": 1, "backend": "sim", "swaps": self.swaps, "uptime_s": up}


class SimDaemon(Daemon):
    """The real daemon on a simulated PC model (see module docstring)."""

    def __init__(self, *a: Any, pc: PcModel, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.pc = pc
        self._record_lock = threading.Lock()

    def _load(self, m: Any, precision: Optional[str] = None) -> tuple[Any, str]:
        return _StubSession(m.model_path), precision or self.inference.precision or m.precision

    def _profile(self, model: Path, backend: Optional[str], precision: Optional[str], args: dict,
                 package: bool = False) -> dict:
        ms = self.pc.latency_ms
        return {"p50_ms": ms * 0.9, "p90_ms": ms * 0.97, "p95_ms": ms, "p99_ms": ms * 1.1, "mean_ms": ms * 0.92,
                "min_ms": ms * 0.8, "max_ms": ms * 1.2, "runs": 1, "threads": 1, "backend": "sim",
                "precision": precision, "simulated": True}

    def _start_streams(self) -> None:
        self.streams = _StubStreams(self)

    def _answer(self, name: str, payload: Optional[bytes], error: Any) -> None:
        """Every command reaches the daemon's own dispatch; deploy and rollback requests are also
        written to ``sim-deploys.jsonl`` first, so a test can prove none was sent twice."""
        if name in ("deploy", "rollback") and error is None:
            with self._record_lock, open(self.state_dir / DEPLOYS, "a") as f:
                f.write(json.dumps({"ts_ms": int(time.time() * 1000), "cmd": name}) + "\n")
        super()._answer(name, payload, error)


def device_record(state_dir: str | Path) -> list[dict]:
    """The deploy/rollback requests a simulated device received (from its state dir)."""
    p = Path(state_dir) / DEPLOYS
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def active_version(state_dir: str | Path) -> Optional[int]:
    """The active model's version as the device's store has it on disk."""
    from prune_pack.agent.store import ModelStore

    s = ModelStore(state_dir).open()
    return s.active.version if s.active else None


class SimFleet:
    """Simulated devices of one process. ``devices``: ``[(site, id, pc_name), ...]``."""

    def __init__(self, root: str | Path, broker: str, username: str, password_file: str, trusted_keys: list[str],
                 pcs: dict[str, PcModel], devices: list[tuple[str, str, str]], telemetry_interval_s: float = 1.0,
                 keepalive_s: int = 30, command_keys: Optional[list[str]] = None) -> None:
        self.root = Path(root)
        self.pcs, self.spec = pcs, devices
        self.interval = telemetry_interval_s
        self.mqtt = MqttSection(broker=broker, username=username, password_file=password_file, keepalive_s=keepalive_s,
                                reconnect_min_s=1.0, reconnect_max_s=5.0)
        # command_keys: the public keys whose signed deploy/rollback requests the agents accept
        self.agent = AgentSection(trusted_keys=list(trusted_keys), telemetry_interval_s=telemetry_interval_s,
                                  watchdog=False, state_dir="", command_keys=list(command_keys or []))
        self.daemons: dict[str, SimDaemon] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def state_dir(self, site: str, dev: str) -> Path:
        return self.root / site / dev

    def _make(self, site: str, dev: str, pc_name: str) -> SimDaemon:
        pc = self.pcs[pc_name]
        mqtt = dataclasses.replace(self.mqtt, client_id=f"sim-{site}-{dev}")
        agent = dataclasses.replace(self.agent, state_dir=str(self.state_dir(site, dev)))
        streams = [StreamSection(name=f"cam{i}", source="sim") for i in range(pc.streams)]
        return SimDaemon(DeviceSection(id=dev, site=site), mqtt, agent, ProfileSection(threads=1),
                         InferenceSection(threads=1, workers=1), streams, pc=pc)

    def seed(self, package: str | Path) -> None:
        """Install and activate ``package`` in every device's store (the real verify + store code)."""
        from prune_pack.agent.package import verify_package
        from prune_pack.agent.store import ModelStore

        for site, dev, _ in self.spec:
            store = ModelStore(self.state_dir(site, dev)).open()
            vp = verify_package(package, trusted_keys=self.agent.trusted_keys, staging_root=store.staging_dir)
            m = store.stage(vp.dir)
            store.activate(m.id)

    def start(self) -> None:
        for site, dev, pc in self.spec:
            d = self._make(site, dev, pc)
            d.start()
            self.daemons[f"{site}/{dev}"] = d
        self._thread = threading.Thread(target=self._telemetry_loop, name="sim-telemetry", daemon=True)
        self._thread.start()

    def wait_online(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name, d in self.daemons.items():
            while not (d.link and d.link.connected):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not connect")
                time.sleep(0.05)

    def _telemetry_loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            for d in list(self.daemons.values()):
                if self._stop.is_set():
                    return
                if d.link is not None:
                    d._send_telemetry()  # noqa: SLF001 - the daemon's own telemetry code
            self._stop.wait(max(0.05, self.interval - (time.monotonic() - t0)))

    def stop(self, names: Optional[list[str]] = None) -> None:
        """Clean stop (retained ``offline``) of some devices, or of all and the telemetry thread."""
        if names is None:
            self._stop.set()
            if self._thread:
                self._thread.join(10)
        for n in list(self.daemons) if names is None else names:
            d = self.daemons.pop(n)
            d.request_stop()
            d.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    """Run a fleet from a JSON spec until SIGTERM; prints ``ready`` once every device is online."""
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    pcs = {k: PcModel(name=k, **v) for k, v in spec["pcs"].items()}
    fleet = SimFleet(spec["root"], spec["broker"], spec["username"], spec["password_file"], spec["trusted_keys"],
                     pcs, [tuple(d) for d in spec["devices"]], spec.get("telemetry_interval_s", 1.0),
                     command_keys=spec.get("command_keys"))
    if spec.get("seed"):
        fleet.seed(spec["seed"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fleet.start()
    fleet.wait_online(300)
    if spec.get("offline"):
        fleet.stop(spec["offline"])
    print("ready", flush=True)
    stop.wait()
    fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
