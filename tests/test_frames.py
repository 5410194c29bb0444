"""Harvested frames from a device to the host over a real Mosquitto: ``prune-pack frames pull``
(end to end from a stream, resumable, through a broker restart, corrupted chunks and files
detected) and ``prune-pack frames stats``."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from test_mqtt_helpers import BASE, DEV, SITE, InProcessDaemon, Watcher, agent_config, package

from prune_pack.agent.frames import CORRUPT_ENV
from prune_pack.agent.harvest import Harvester, list_frames
from prune_pack.agent.settings import HarvestSection, MqttSection
from prune_pack.cli import main
from prune_pack.deploy.frames import FramesPullError, parse_since, pull, sha256_file
from prune_pack.deploy.remote import RemoteDevice



def _stream(telemetry: dict, name: str) -> dict:
    """One stream's entry of a telemetry/2 message (streams are a list with a ``stream`` field)."""
    return next((x for x in telemetry.get("streams", []) if x.get("stream") == name), {})

def host_mqtt(broker) -> MqttSection:
    return MqttSection(broker=broker.url, username="host", password_env="PP_HOST_PW")


def factory(broker):
    return lambda: RemoteDevice(host_mqtt(broker), DEV, SITE)


def fill_pool(state: Path, n: int, size: int = 128) -> dict[str, str]:
    """n distinct noise frames in the daemon's pool (before it starts); name -> sha256."""
    h = Harvester(HarvestSection(interval_s=0, min_free_mb=0, jpeg_quality=95), state / "harvest")
    h.start()
    for i in range(n):
        img = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
        assert h.offer("cam", img, 1.7e9 + i, np.zeros((0, 6), np.float32)) == "queued"
        assert h.wait_idle()
    h.stop()
    return {e.name: e.sha256 for e in h.pool.entries.values()}


def start_device(broker, tmp_path, monkeypatch, **harvest) -> tuple[InProcessDaemon, Watcher]:
    monkeypatch.setenv("PP_HOST_PW", "host-secret")
    cfg = agent_config(tmp_path, broker)
    cfg["harvest"] = {"min_free_mb": 0, **harvest}
    w = Watcher(broker)
    d = InProcessDaemon(cfg)
    w.status("online")
    return d, w


def _video(path: Path, n: int = 40) -> str:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (96, 96))
    for i in range(n):
        img = np.full((96, 96, 3), 100, np.uint8)
        cv2.rectangle(img, (5 * i % 80, 30), (5 * i % 80 + 16, 60), (10, 10, 10), -1)  # a dark box moving
        vw.write(img)
    vw.release()
    return str(path)


def test_stream_harvest_then_cli_pull_and_stats(broker, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PP_HOST_PW", "host-secret")
    cfg = agent_config(tmp_path, broker)
    # the files play once: the pool is final before the pulls (a looping stream would keep evicting)
    cfg["streams"] = [{"name": "cam1", "source": _video(tmp_path / "cam1.avi"), "fps_limit": 50.0, "harvest": True,
                       "loop": False},
                      {"name": "cam2", "source": _video(tmp_path / "cam2.avi"), "fps_limit": 50.0, "loop": False}]
    cfg["harvest"] = {"interval_s": 0.0, "min_free_mb": 0, "max_frames": 6}
    w = Watcher(broker)
    d = InProcessDaemon(cfg)
    try:
        w.status("online")
        assert w.call("deploy", {"path": str(package(tmp_path, 1))})["ok"]  # starts the streams
        w.wait_for(lambda t, b: t.endswith("/telemetry") and _stream(b, "cam1").get("state") == "ended"
                         and _stream(b, "cam1")["in_flight"] == 0)[1]
        hv, deadline = d.daemon.harvester, time.monotonic() + 20
        processed = d.daemon.streams.metrics()["streams"]["cam1"]["frames_processed"]
        while hv.status()["sampled"] < processed and time.monotonic() < deadline:  # the last offer follows _finish
            time.sleep(0.02)
        assert hv.wait_idle()
        st = hv.status()
        assert st["state"] == "active" and st["frames"] == 6 and st["kept"] >= 6 and st["sampled"] >= 6
        host = tmp_path / "host.yaml"
        host.write_text(yaml.safe_dump({"device": {"site": SITE}, "mqtt": {"username": "host", "password_env": "PP_HOST_PW"}}))
        out = tmp_path / "frames"
        args = ["frames", "pull", "--device", DEV, "--out", str(out), "--config", str(host), "--broker", broker.url, "--json"]
        assert main(args + ["--max", "2"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["fetched"] == 2 and res["listed"] == 6 and res["failed"] == []
        assert main(args) == 0  # the rest; the first two are verified and skipped
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (res["present"], res["fetched"], res["gone"], res["listed"]) == (2, 4, 0, 6)
        frames = list_frames(out)
        assert len(frames) == res["frames_in_out"] == 6 and all(p.name.startswith("cam1_") for p in frames)
        side = json.loads(frames[0].with_suffix(".json").read_text())
        assert side["stream"] == "cam1" and side["model"]["version"] == 1 and side["why"] in ("novel", "uncertain")
        assert cv2.imread(str(frames[0])).shape == (96, 96, 3)
        assert main(["frames", "stats", str(out), "--json"]) == 0
        st = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert st["frames"] == len(frames) and st["by_stream"] == {"cam1": len(frames)} and st["partial"] == 0
        assert main(["frames", "stats", "--device", DEV, "--config", str(host), "--broker", broker.url, "--json"]) == 0
        st = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert st["pool"]["state"] == "active" and st["pool"]["frames"] == 6
    finally:
        d.stop()
        w.close()
    assert not w.invalid, w.invalid


def test_pull_resumes_a_partial_file_and_detects_corruption(broker, tmp_path, monkeypatch):
    shas = fill_pool(tmp_path / "state", 4)
    monkeypatch.setenv(CORRUPT_ENV, "1")  # the device flips a byte of its first chunk after hashing it
    d, w = start_device(broker, tmp_path, monkeypatch, chunk_kb=8)
    try:
        out = tmp_path / "frames"
        out.mkdir()
        first = sorted(shas)[0]
        src = tmp_path / "state" / "harvest" / first
        (out / (first + ".part")).write_bytes(src.read_bytes()[:10000])  # an interrupted earlier pull
        res = pull(factory(broker), out, timeout=10)
        assert res["fetched"] == 4 and res["resumed"] == 1 and res["bad_chunks"] == 1
        assert {p.name: sha256_file(p) for p in list_frames(out)} == shas
        assert not list(out.glob("*.part"))
        # a file corrupted on the device (its sidecar's sha256 no longer matches): detected, not kept
        bad = sorted(shas)[1]
        (out / bad).unlink()
        data = bytearray((tmp_path / "state" / "harvest" / bad).read_bytes())
        data[len(data) // 2] ^= 0x55
        (tmp_path / "state" / "harvest" / bad).write_bytes(bytes(data))
        with pytest.raises(FramesPullError, match=f"sha256 check.*{bad}"):
            pull(factory(broker), out, timeout=10)
        assert not (out / bad).exists() and not list(out.glob("*.part")) and len(list_frames(out)) == 3
    finally:
        d.stop()
        w.close()


def test_pull_survives_a_broker_restart_mid_transfer(broker, tmp_path, monkeypatch):
    shas = fill_pool(tmp_path / "state", 6, size=160)  # ~75 KB each
    d, w = start_device(broker, tmp_path, monkeypatch, chunk_kb=8, pull_kbps=150)  # ~3 s of transfer
    out = tmp_path / "frames"
    result: dict = {}

    def run() -> None:
        try:
            result["res"] = pull(factory(broker), out, timeout=3, retry_s=60, log=lambda m: None)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=run)
    try:
        t.start()
        deadline = time.monotonic() + 30
        while not list(out.glob("*.jpg")) and time.monotonic() < deadline:  # the first frame is complete
            time.sleep(0.05)
        assert list(out.glob("*.jpg")), "no frame arrived"
        broker.restart()
        w.reconnect()
        t.join(90)
        assert not t.is_alive() and "error" not in result, result
        res = result["res"]
        assert res["reconnects"] >= 1 and res["fetched"] == 6
        assert {p.name: sha256_file(p) for p in list_frames(out)} == shas
        assert pull(factory(broker), out, timeout=10)["present"] == 6  # nothing left to fetch
    finally:
        t.join(5)
        d.stop()
        w.close()


def test_frames_commands_refuse_bad_requests(broker, tmp_path, monkeypatch):
    fill_pool(tmp_path / "state", 1)
    d, w = start_device(broker, tmp_path, monkeypatch)
    try:
        r = w.call("frames-read", {"name": "../agent.yaml"})
        assert not r["ok"] and r["error"]["reason"] == "bad_request"
        r = w.call("frames-read", {"name": "cam_1700000009000.jpg"})
        assert not r["ok"] and r["error"]["reason"] == "not_found"
        r = w.call("frames-list", {"limit": 0})
        assert r["ok"] and r["result"]["frames"] == [] and r["result"]["pool"]["frames"] == 1
        assert r["result"]["pool"]["state"] == "off"  # no stream harvests; the kept pool is still readable
    finally:
        d.stop()
        w.close()
    assert not w.invalid, w.invalid


def test_parse_since():
    assert parse_since(None) == 0
    assert parse_since("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_since("2023-11-14T23:13:20+01:00") == 1_700_000_000_000
    assert parse_since("1700000000") == 1_700_000_000_000
    assert parse_since("2h", now=1_700_007_200) == 1_700_000_000_000
    from prune_pack.errors import UserInputError

    with pytest.raises(UserInputError):
        parse_since("yesterday")


def test_read_only_pool_shows_paused_in_telemetry_and_streams_go_on(broker, tmp_path, monkeypatch):
    import os
    import subprocess

    pool = tmp_path / "ro-pool"
    pool.mkdir()
    if os.geteuid() != 0:
        pool.chmod(0o555)
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(pool)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    monkeypatch.setenv("PP_HOST_PW", "host-secret")
    cfg = agent_config(tmp_path, broker)
    cfg["streams"] = [{"name": "cam1", "source": _video(tmp_path / "cam1.avi"), "fps_limit": 50.0, "harvest": True}]
    cfg["harvest"] = {"dir": str(pool), "interval_s": 0.0, "min_free_mb": 0}
    w = Watcher(broker)
    d = InProcessDaemon(cfg)
    try:
        w.status("online")
        assert w.call("deploy", {"path": str(package(tmp_path, 1))})["ok"]
        tel = w.wait_for(lambda t, b: t.endswith("/telemetry") and (b.get("harvest") or {}).get("state") == "paused")[1]
        assert tel["harvest"]["reason"] in ("read-only file system", "permission denied") and tel["harvest"]["frames"] == 0
        mark = w.mark()
        w.wait_for(lambda t, b: t.endswith("/telemetry") and _stream(b, "cam1").get("frames_processed", 0)
                   > _stream(tel, "cam1")["frames_processed"], start=mark)  # inference goes on
        assert w.call("ping")["ok"]
    finally:
        d.stop()
        w.close()
        if os.geteuid() == 0:
            subprocess.run(["umount", str(pool)], check=False)
    assert not w.invalid, w.invalid
