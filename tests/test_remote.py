"""deploy.remote (the host side) against a real daemon and a real Mosquitto: calls, profile of a
candidate (never activated), deploy, rejections, offline devices, and the CLI commands
``prune-pack deploy`` / ``prune-pack devices``."""

from __future__ import annotations

import json

import pytest
import yaml

from test_mqtt_helpers import DEV, SITE, InProcessDaemon, Watcher, agent_config, package, tampered

from prune_pack.agent.settings import MqttSection
from prune_pack.cli import main
from prune_pack.deploy.remote import DeviceUnavailable, RemoteCommandError, RemoteDevice, fleet
from prune_pack.errors import PackageRejected


def host_mqtt(broker) -> MqttSection:
    return MqttSection(broker=broker.url, username="host", password_env="PP_HOST_PW")


@pytest.fixture
def device(broker, tmp_path, monkeypatch):
    monkeypatch.setenv("PP_HOST_PW", "host-secret")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # the host's own key signs commands
    w = Watcher(broker)
    d = InProcessDaemon(agent_config(tmp_path, broker))
    w.status("online")
    yield d
    d.stop()
    assert not w.invalid, w.invalid
    w.close()


def test_remote_calls_profile_deploy_and_errors(broker, device, tmp_path):
    v1, v2 = package(tmp_path, 1), package(tmp_path, 2)
    with RemoteDevice(host_mqtt(broker), DEV, SITE) as dev:
        assert dev.ping()["pong"] is True
        r = dev.profile_package(v1, runs=3, warmup=0, timeout=60)
        assert r["activated"] is False and r["runs"] == 3 and r["model"]["version"] == 1
        assert dev.call("status")["model"] is None  # profiling never activates
        r = dev.deploy_package(v2)
        assert r["active"]["version"] == 2
        with pytest.raises(PackageRejected, match="hash_mismatch|bad_signature"):
            dev.deploy_package(tampered(tmp_path, v1))
        with pytest.raises(PackageRejected, match="older_version"):
            dev.deploy_package(v1)
        with pytest.raises(RemoteCommandError, match="unknown_command"):
            dev.call("selfdestruct")
        assert dev.call("status")["model"]["version"] == 2
    # "site/device" form, and a device that never existed
    with RemoteDevice(host_mqtt(broker), f"{SITE}/{DEV}") as dev:
        assert dev.ping()["pong"]
    with RemoteDevice(host_mqtt(broker), "ghost", SITE) as ghost:
        with pytest.raises(DeviceUnavailable, match="never reported"):
            ghost.ping()
    devices = fleet(host_mqtt(broker), wait_s=1.0)
    assert [(d["device"], d["state"]) for d in devices] == [(DEV, "online")]
    assert devices[0]["model"]["version"] == 2 and devices[0]["last_telemetry_ts_ms"]


def test_no_answer_and_offline_device(broker, tmp_path, monkeypatch):
    monkeypatch.setenv("PP_HOST_PW", "host-secret")
    w = Watcher(broker)
    # A retained "online" status with no agent behind it: the call times out after its retries.
    fake = {"schema": "status/1", "device_id": "zombie", "site": SITE, "session": 1, "seq": 1, "ts_ms": 1,
            "state": "online", "agent_version": "0", "started_ts_ms": 1, "model": None, "previous": None, "streams": []}
    w.client.publish(f"prunepack/{SITE}/zombie/status", json.dumps(fake), qos=1, retain=True).wait_for_publish(5)
    with RemoteDevice(host_mqtt(broker), "zombie", SITE) as dev:
        with pytest.raises(DeviceUnavailable, match="did not answer ping within 1 s .2 attempts"):
            dev.call("ping", timeout=1.0, retries=1)
    lost = {**fake, "state": "lost", "seq": 0}
    for k in ("agent_version", "started_ts_ms", "model", "previous", "streams"):
        lost.pop(k)
    w.client.publish(f"prunepack/{SITE}/zombie/status", json.dumps(lost), qos=1, retain=True).wait_for_publish(5)
    with RemoteDevice(host_mqtt(broker), "zombie", SITE) as dev:
        with pytest.raises(DeviceUnavailable, match="is lost since"):
            dev.profile_package(package(tmp_path, 1))
    bad = MqttSection(broker=broker.url, username="host", password_env="PP_WRONG_PW")
    monkeypatch.setenv("PP_WRONG_PW", "nope")
    with pytest.raises(DeviceUnavailable, match="refused"):
        RemoteDevice(bad, "zombie", SITE).connect()
    w.close()


def test_cli_deploy_and_devices(broker, device, tmp_path, capsys):
    cfg = tmp_path / "host.yaml"
    cfg.write_text(yaml.safe_dump({"device": {"site": SITE},
                                   "mqtt": {"username": "host", "password_env": "PP_HOST_PW"}}))
    pkg = package(tmp_path, 1)
    assert main(["deploy", str(pkg), "--device", DEV, "--config", str(cfg), "--broker", broker.url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["active"]["version"] == 1 and out["device"] == f"{SITE}/{DEV}"
    assert main(["devices", "--config", str(cfg), "--broker", broker.url, "--wait", "1"]) == 0
    text = capsys.readouterr().out
    assert f"{SITE}/{DEV}" in text and "online" in text and "tiny v1" in text
    # a rejected package: one line on stderr and the package exit code
    assert main(["deploy", str(package(tmp_path, 2, signed=False)), "--device", DEV, "--config", str(cfg),
                 "--broker", broker.url]) == PackageRejected.exit_code
    err = capsys.readouterr().err
    assert "unsigned" in err and len(err.strip().splitlines()) == 1
    assert main(["deploy", str(pkg), "--device", "nobody", "--config", str(cfg), "--broker", broker.url]) == DeviceUnavailable.exit_code
