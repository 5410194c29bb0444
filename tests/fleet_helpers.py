"""A small real fleet for the monitoring tests: real agents (``Daemon`` in this process, streams
from OpenCV-written videos, the tiny ONNX model in a signed package with a latency target) on the
real Mosquitto fixture, plus a real Prometheus started on 127.0.0.1 (skipped when not installed,
a failure on CI, where .ci/run installs it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml

from conftest import ON_CI, free_port
from test_mqtt_helpers import InProcessDaemon, agent_config, keys, package

from prune_pack.agent.settings import MqttSection

REPO = Path(__file__).resolve().parent.parent
TARGET_MS = 40.0


def stop_cli(proc: subprocess.Popen) -> dict:
    """SIGTERM a long-running ``prune-pack`` command (exporter, dashboard): it must exit 0 and print
    its JSON summary as the last stdout line."""
    import signal

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def need_binary(name: str, package: str) -> str:
    exe = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if exe is None:
        if ON_CI:
            pytest.fail(f"{name} is not installed (.ci/run must apt-get install {package})")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return exe


def video(path: Path, frames: int = 30, size: int = 64) -> str:
    import cv2
    import numpy as np

    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    rng = np.random.default_rng(len(str(path)))
    for _ in range(frames):
        vw.write(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    vw.release()
    return str(path)


def host_mqtt(broker: Any, tmp: Path, user: str = "viewer") -> MqttSection:
    pw = tmp / f"{user}.pw"
    pw.write_text(broker.users[user] + "\n")
    return MqttSection(broker=broker.url, username=user, password_file=str(pw), keepalive_s=5,
                       reconnect_min_s=1.0, reconnect_max_s=2.0)


def device_config(tmp: Path, broker: Any, site: str, dev: str, keepalive_s: int = 5) -> dict:
    cfg = agent_config(tmp, broker, telemetry_interval_s=0.5)
    cfg["device"] = {"id": dev, "site": site}
    cfg["agent"]["state_dir"] = str(tmp / f"state-{site}-{dev}")
    cfg["mqtt"]["keepalive_s"] = keepalive_s
    cfg["streams"] = [{"name": "cam1", "source": video(tmp / f"{site}-{dev}.avi"), "fps_limit": 15.0}]
    cfg["inference"] = {"threads": 1, "workers": 1, "conf": 0.01}
    return cfg


def target_package(tmp: Path, version: int = 1) -> Path:
    return package(tmp, version, target={"latency_ms": TARGET_MS, "percentile": "p95"})


def deploy(broker: Any, tmp: Path, site: str, dev: str, pkg: Path) -> None:
    from prune_pack.deploy.remote import RemoteDevice

    # signed with the key agent_config made the agents trust for commands (agent.command_keys)
    with RemoteDevice(host_mqtt(broker, tmp, "host"), dev, site, command_key=keys(tmp)[0]) as rd:
        assert rd.deploy_package(pkg, timeout=60)["changed"]


def start_agents(tmp: Path, broker: Any, devices: list[tuple[str, str]]) -> list[InProcessDaemon]:
    """Agents started and serving ``target_package`` (deployed over MQTT by the host tool)."""
    pkg = target_package(tmp)
    out = []
    try:
        for site, dev in devices:
            out.append(InProcessDaemon(device_config(tmp, broker, site, dev)))
        for (site, dev), d in zip(devices, out):
            deadline = time.monotonic() + 20
            while not (d.daemon.link and d.daemon.link.connected):
                assert time.monotonic() < deadline, f"{site}/{dev} did not connect"
                time.sleep(0.05)
            deploy(broker, tmp, site, dev, pkg)
    except BaseException:
        for d in out:
            d.stop()
        raise
    return out


def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - 127.0.0.1 only
        return r.read().decode()


class Prometheus:
    """A real Prometheus on 127.0.0.1 (free port, temp storage, 1 s scrape and rule interval)."""

    def __init__(self, tmp: Path, target: str, rules: Optional[Path] = None) -> None:
        self.exe = need_binary("prometheus", "prometheus")
        self.port = free_port()
        self.root = tmp / "prometheus"
        self.root.mkdir(exist_ok=True)
        cfg: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "prunepack", "honor_labels": True,
                                "static_configs": [{"targets": [target]}]}],
        }
        if rules is not None:
            cfg["rule_files"] = [str(rules)]
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(self.root / "prometheus.log", "wb")
        self.proc = subprocess.Popen([self.exe, f"--config.file={self.root / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.root / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, 30, "prometheus to be ready")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {(self.root / 'prometheus.log').read_text()[-1500:]}")
        try:
            return "Ready" in http_get(f"http://127.0.0.1:{self.port}/-/ready", 1.0)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        q = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"http://127.0.0.1:{self.port}/api/v1/{path}?{q}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def publish_rollout_state(broker: Any, rid: str, devices: dict[str, str], state: str = "running") -> dict:
    """A retained ``{prefix}/_rollout/{ID}`` state as ``prune-pack rollout`` publishes it (docs/mqtt.md)."""
    import paho.mqtt.client as paho

    body = {"schema": "rollout-state/1", "id": rid, "state": state, "by": "ops@host",
            "package": {"name": "tiny", "version": 2, "sha256": "b" * 64}, "gate_p95_ms": TARGET_MS,
            "started_ts_ms": int(time.time() * 1000) - 60_000, "ts_ms": int(time.time() * 1000), "why": "",
            "counts": {}, "devices": devices}
    for ph in devices.values():
        body["counts"][ph] = body["counts"].get(ph, 0) + 1
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"rollout-{rid}")
    c.username_pw_set("host", broker.users["host"])
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(f"prunepack/_rollout/{rid}", json.dumps(body), qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
    return body
