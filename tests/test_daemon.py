"""The daemon in-process against a real Mosquitto (password file + ACL): every command, the
bad requests, deploy/reject/rollback, sd_notify, and a hypothesis fuzz of every command topic.
Every message the device publishes is validated against its JSON Schema by the Watcher."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_mqtt_helpers import (
    BASE,
    InProcessDaemon,
    NotifySocket,
    Watcher,
    agent_config,
    package,
    tampered,
)

import prune_pack.agent.daemon  # noqa: F401 - declares the commands
from prune_pack.agent.commands import REGISTRY


@pytest.fixture
def running(broker, tmp_path):
    w = Watcher(broker)
    d = InProcessDaemon(agent_config(tmp_path, broker, max_payload_kb=64.0, max_inline_mb=0.04,
                                     fetch_allowed_hosts=["127.0.0.1"]))
    w.status("online")
    yield d, w
    d.stop()
    w.close()
    assert not w.invalid, w.invalid


@contextlib.contextmanager
def _http_server(root):
    """A real HTTP server on 127.0.0.1 serving ``root`` (deploy by URL)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def b64(p) -> str:
    return base64.b64encode(p.read_bytes()).decode()


def active(w: Watcher) -> dict:
    return w.call("status")["result"]["model"]


def test_commands_deploy_reject_rollback(running, tmp_path):
    d, w = running
    assert w.call("ping")["result"]["pong"] is True
    assert active(w) is None
    r = w.call("profile")
    assert not r["ok"] and r["error"]["reason"] == "no_active_model"
    assert w.call("rollback")["error"]["reason"] == "no_previous"

    v1, v2 = package(tmp_path, 1), package(tmp_path, 2)
    r = w.call("deploy", {"package_b64": b64(v1)})
    assert r["ok"], r
    assert r["result"]["active"]["version"] == 1 and r["result"]["signed"] is True
    assert r["result"]["profile"]["runs"] == 5
    status = w.status("online", start=0)  # the retained status is republished on a switch
    assert w.wait_for(lambda t, b: t == f"{BASE}/status" and (b.get("model") or {}).get("version") == 1)

    # profile of a candidate: measured, never activated, nothing stored
    r = w.call("profile", {"path": str(v2), "backend": "ort"})
    assert r["ok"] and r["result"]["activated"] is False and r["result"]["model"]["version"] == 2
    assert r["result"]["p50_ms"] > 0 and r["result"]["runs"] == 5
    assert active(w)["version"] == 1
    assert [m["version"] for m in w.call("list-models")["result"]["models"]] == [1]
    r = w.call("profile", {"runs": 3})  # the active model
    assert r["ok"] and r["result"]["runs"] == 3 and r["result"]["model"]["version"] == 1

    # rejected packages: the old model keeps serving
    for bad, reason in ((tampered(tmp_path, v2), {"hash_mismatch", "bad_signature"}),
                        (package(tmp_path, 3, signed=False), {"unsigned"})):
        r = w.call("deploy", {"path": str(bad)})
        assert not r["ok"] and r["error"]["reason"] in reason, r
        assert active(w)["version"] == 1
        assert w.call("profile", {"runs": 2})["ok"]  # still loaded and running
    assert d.daemon.session is not None

    with _http_server(tmp_path) as base:
        r = w.call("deploy", {"url": f"{base}/{v2.name}"})
        assert r["ok"] and r["result"]["previous"]["version"] == 1, r
        assert w.call("deploy", {"url": f"{base}/missing.ppk"})["error"]["reason"] == "fetch_failed"
    assert active(w)["version"] == 2
    # older than the active one: refused unless forced
    r = w.call("deploy", {"path": str(v1)})
    assert not r["ok"] and r["error"]["reason"] == "older_version"
    assert active(w)["version"] == 2

    r = w.call("rollback")
    assert r["ok"] and r["result"]["active"]["version"] == 1 and r["result"]["previous"]["version"] == 2
    assert active(w)["version"] == 1
    models = {m["version"]: m for m in w.call("list-models")["result"]["models"]}
    assert models[1]["state"] == "active" and models[2]["state"] == "previous"
    r = w.call("activate", {"model": models[2]["id"]})
    assert r["ok"] and active(w)["version"] == 2
    r = w.call("activate", {"model": models[1]["sha256"][:12]})  # v1 and v2 carry the same ONNX: a sha256 prefix matches both
    assert not r["ok"] and r["error"]["reason"] == "ambiguous"
    assert w.call("activate", {"model": "ffffffffffff"})["error"]["reason"] == "not_found"
    r = w.call("deploy", {"url": v1.as_uri(), "force": True})
    assert r["ok"] and active(w)["version"] == 1
    assert status["state"] == "online"


def test_validated_backends_and_multi_backend_profile(running, tmp_path):
    d, w = running
    # validated on the host for OpenVINO only; this agent serves with ONNX Runtime
    ov_only = package(tmp_path, 1, validated=[{"backend": "openvino", "precision": "fp32"}])
    r = w.call("deploy", {"path": str(ov_only)})
    assert not r["ok"] and r["error"]["reason"] == "not_validated"
    assert active(w) is None
    assert w.call("deploy", {"path": str(ov_only), "force": True})["ok"]
    # profile measures every requested backend/precision and says which were validated
    r = w.call("profile", {"path": str(ov_only), "backend": "all", "runs": 2, "warmup": 0})
    assert r["ok"], r
    results = r["result"]["results"]
    got = {(x["backend"], x["precision"]) for x in results}
    assert ("ort", "fp32") in got and all(x["runs"] == 2 for x in results)
    by = {(x["backend"], x["precision"]): x["validated"] for x in results}
    assert by[("ort", "fp32")] is False
    if ("openvino", "fp32") in by:
        assert by[("openvino", "fp32")] is True


def test_bad_requests_are_answered(running, tmp_path):
    d, w = running
    r = w.raw("ping", b"{not json")
    assert not r["ok"] and r["error"]["reason"] == "bad_json" and r["request_id"] is None
    r = w.raw("ping", b"\xff\xfe")
    assert r["error"]["reason"] == "bad_json"
    r = w.raw("ping", "[1, 2]")
    assert r["error"]["reason"] == "bad_request" and r["request_id"] is None
    r = w.raw("ping", "{}")
    assert r["error"]["reason"] == "bad_request" and r["request_id"] is None
    r = w.raw("status", json.dumps({"request_id": 7}))
    assert r["error"]["reason"] == "bad_request" and r["request_id"] is None
    r = w.call("reboot")
    assert r["error"]["reason"] == "unknown_command" and r["request_id"]
    r = w.call("profile", {"runs": "many"})
    assert r["error"]["reason"] == "bad_request" and "runs" in r["error"]["detail"]
    r = w.call("profile", {"runs": True})
    assert r["error"]["reason"] == "bad_request"
    r = w.call("profile", {"runs": 10**9})
    assert r["error"]["reason"] == "bad_request"
    r = w.call("ping", {"colour": "blue"})
    assert r["error"]["reason"] == "bad_request"
    r = w.call("deploy", {})
    assert r["error"]["reason"] == "bad_request"
    r = w.call("deploy", {"path": "/a", "url": "file:///a"})
    assert r["error"]["reason"] == "bad_request"
    r = w.call("deploy", {"package_b64": "@@@@"})
    assert r["error"]["reason"] == "bad_request"
    r = w.call("deploy", {"url": "ftp://x/y.ppk"})
    assert r["error"]["reason"] == "bad_request"
    r = w.call("deploy", {"path": str(tmp_path / "missing.ppk")})
    assert r["error"]["reason"] == "not_a_package"
    r = w.call("deploy", {"package_b64": base64.b64encode(b"x" * 45_000).decode()})  # over max_inline_mb
    assert r["error"]["reason"] == "too_large"
    r = w.raw("ping", json.dumps({"request_id": "big", "pad": "x" * 70_000}))  # over max_payload_kb
    assert r["error"]["reason"] == "payload_too_large" and r["request_id"] is None
    assert w.call("activate", {})["error"]["reason"] == "bad_request"
    assert w.call("ping")["ok"]  # still alive and answering
    assert all(t.is_alive() for t in d.daemon._workers)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2000) | st.floats(-5, 5, allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_field_names = st.sampled_from(sorted({k for c in REGISTRY.values() for k in c.args} | {"request_id", "x"}))
_requests = st.dictionaries(_field_names, _json, max_size=4).map(
    lambda d: {k: v for k, v in d.items() if k not in ("seconds", "path", "url") or not isinstance(v, (int, float, str))})
_payloads = st.one_of(
    st.binary(max_size=64),
    _json.map(lambda v: json.dumps(v).encode()),
    _requests.map(lambda d: json.dumps(d).encode()),
)


def test_fuzz_every_command_topic_is_answered(running, tmp_path):
    """Arbitrary bytes and JSON on every command topic: every request gets exactly one answer
    (request_id echoed when it was a valid one, else null) and the daemon keeps running."""
    d, w = running
    assert w.call("deploy", {"package_b64": b64(package(tmp_path, 1))})["ok"]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(cmd=st.sampled_from(sorted(REGISTRY) + ["bogus"]), payload=_payloads)
    def one(cmd, payload):
        r = w.raw(cmd, payload, timeout=30)
        try:
            sent = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            sent = None
        rid = sent.get("request_id") if isinstance(sent, dict) else None
        expected = rid if isinstance(rid, str) and 1 <= len(rid) <= 128 else None
        assert r["request_id"] == expected
        assert r["ok"] is ("result" in r)

    one()
    assert w.call("ping")["ok"]
    assert active(w)["version"] in (1,)  # no fuzzed request may change the active model without a package


def test_sd_notify_ready_watchdog_stopping(broker, tmp_path, monkeypatch):
    sock = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", sock.env)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    cfg = agent_config(tmp_path, broker)
    d = InProcessDaemon(cfg)
    try:
        got = sock.collect_until(lambda m: sum(x == "WATCHDOG=1" for x in m) >= 2)
        assert got[0].startswith("READY=1")
    finally:
        d.stop()
    got = sock.collect_until(lambda m: "STOPPING=1" in m)
    assert got.index("STOPPING=1") > got.index("WATCHDOG=1")
    sock.close()


def _video(path, frames: int = 20) -> str:
    import cv2
    import numpy as np

    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        vw.write(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    vw.release()
    return str(path)


def test_streams_detections_telemetry_and_hot_swap(broker, tmp_path):
    cfg = agent_config(tmp_path, broker)
    cfg["streams"] = [{"name": "cam1", "source": _video(tmp_path / "cam1.avi"), "publish_detections": True,
                       "detections_rate_hz": 20.0, "fps_limit": 20.0}]
    cfg["inference"]["conf"] = 0.01
    w = Watcher(broker)
    d = InProcessDaemon(cfg)
    try:
        w.status("online")
        assert w.call("deploy", {"path": str(package(tmp_path, 1))})["ok"]  # starts the streams
        det = w.wait_for(lambda t, b: t == f"{BASE}/detections/cam1")[1]
        assert det["stream"] == "cam1" and isinstance(det["detections"], list)
        tel = w.wait_for(lambda t, b: t.endswith("/telemetry") and any(
            s["stream"] == "cam1" and s["frames_processed"] >= 3 for s in b.get("streams", [])))[1]
        (cam,) = tel["streams"]
        assert cam["stream"] == "cam1" and cam["frames_read"] >= cam["frames_processed"] >= 3
        h = cam["latency_seconds"]  # cumulative histogram over every processed frame of the session
        assert h["count"] == cam["frames_processed"] and h["counts"] == sorted(h["counts"]) and h["counts"][-1] <= h["count"]
        assert 0 < h["sum"] and len(h["counts"]) == len(h["bounds"])
        assert sum(cam["detections_by_class"].values()) >= 1  # conf 0.01 on noise: tiny.onnx finds something
        assert {x["name"] for x in det["detections"]} <= set(cam["detections_by_class"])  # by class name
        assert w.call("deploy", {"path": str(package(tmp_path, 2))})["ok"]  # hot swap, streams keep running
        mark = w.mark()
        w.wait_for(lambda t, b: t == f"{BASE}/detections/cam1", start=mark)
        assert d.daemon.streams.model_path == d.daemon.store.active.model_path
    finally:
        d.stop()
        w.close()
    assert not w.invalid, w.invalid


def test_telemetry_measures_this_process(tmp_path):
    """Without a broker the daemon still runs; its telemetry numbers come from this process."""
    from test_mqtt_helpers import sections

    from prune_pack.agent.daemon import Daemon

    d = Daemon.from_config(sections(agent_config(tmp_path, None)))
    d.start()
    try:
        d.telemetry()
        end = time.process_time() + 0.3
        while time.process_time() < end:  # burn CPU in this process
            pass
        t = d.telemetry()
        assert t["cpu_percent"] > 0 and t["rss_mb"] > 10 and len(t["load"]) == 3
        assert t["model"] is None and t["queue"] == {"pending": 0, "dropped": 0}
    finally:
        d.shutdown()


def test_profile_request_runs_win_over_the_device_profile_seconds(broker, tmp_path):
    """issue #14: with ``profile.seconds`` in the device config, the host's ``runs`` used to be
    ignored (the config's seconds won). Options resolve through settings.merged; an explicit
    ``runs`` without ``seconds`` clears the config's seconds; without flags the config holds."""
    cfg = agent_config(tmp_path, broker)
    cfg["profile"] = {"runs": 5, "warmup": 0, "threads": 1, "seconds": 0.3}
    w = Watcher(broker)
    d = InProcessDaemon(cfg)
    try:
        w.status("online")
        assert w.call("deploy", {"package_b64": b64(package(tmp_path, 1))})["ok"]
        r = w.call("profile", {"runs": 3})
        assert r["ok"], r
        assert r["result"]["runs"] == 3 and r["result"]["seconds"] is None
        r = w.call("profile", {"runs": 3, "seconds": 0.2})  # both given: seconds decides
        assert r["ok"] and r["result"]["seconds"] == 0.2
        r = w.call("profile", {"warmup": 0})  # nothing about counts: the config's seconds
        assert r["ok"] and r["result"]["seconds"] == 0.3
    finally:
        d.stop()
        w.close()
    assert not w.invalid, w.invalid
