"""Issue #18, against a real agent and a real Mosquitto: signed commands, rollback protection that
remembers, fetch limits, bad paths. Each test reproduces a finding of the attack report."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time

import pytest

from test_mqtt_helpers import (
    DEV,
    SITE,
    InProcessDaemon,
    Watcher,
    agent_config,
    keys,
    package,
)

from prune_pack.agent.cmdauth import sign_request
from prune_pack.agent.keys import generate_keypair


@pytest.fixture
def agent(broker, tmp_path):
    started: list[InProcessDaemon] = []
    w = Watcher(broker)

    def start(**agent_kw):
        mark = w.mark() if started else 0  # before the start: its "online" may come at once
        d = InProcessDaemon(agent_config(tmp_path, broker, **agent_kw))
        started.append(d)
        w.status("online", start=mark)
        return d

    yield start, w
    for d in started:
        d.stop()
    w.close()
    assert not w.invalid, w.invalid


def _version(w: Watcher) -> tuple:
    m = w.call("status")["result"]["model"]
    return (m["name"], m["version"]) if m else None


# ---------------------------------------------------------------- 1. authority beyond the broker


def test_commands_that_change_the_device_need_a_valid_signature(agent, tmp_path):
    start, w = agent
    d = start()
    v1 = package(tmp_path, 1)
    # unsigned: refused for everything that changes or runs code, open for read-only commands
    for cmd, body in (("deploy", {"path": str(v1)}), ("rollback", {}), ("activate", {"model": "0" * 12}),
                      ("profile", {"path": str(v1)})):
        r = w.call(cmd, body, sign=False)
        assert r["error"]["reason"] == "unsigned_command", (cmd, r)
    for cmd in ("ping", "status", "list-models"):
        assert w.call(cmd, sign=False)["ok"]
    assert w.call("profile", {"runs": 2}, sign=False)["error"]["reason"] == "no_active_model"  # the active model: open

    priv = keys(tmp_path)[0]
    base = {"request_id": "x1", "path": str(v1)}
    # another device, an expired signature, a foreign key, a tampered argument
    other = sign_request("deploy", base, priv, f"{SITE}/other-device")
    assert w.call("deploy", other, sign=False)["error"]["reason"] == "wrong_device"
    old = sign_request("deploy", base, priv, f"{SITE}/{DEV}", now=time.time() - 3600)
    assert w.call("deploy", old, sign=False)["error"]["reason"] == "expired_command"
    foreign, _ = generate_keypair(tmp_path / "foreign")
    r = w.call("deploy", sign_request("deploy", base, foreign, f"{SITE}/{DEV}"), sign=False)
    assert r["error"]["reason"] == "untrusted_command_key"
    forged = sign_request("deploy", base, priv, f"{SITE}/{DEV}")
    forged["force"] = True  # added after signing
    assert w.call("deploy", forged, sign=False)["error"]["reason"] == "bad_command_signature"
    as_rollback = sign_request("deploy", base, priv, f"{SITE}/{DEV}")  # signed for deploy, sent to rollback
    assert w.call("rollback", {k: v for k, v in as_rollback.items() if k != "path"}, sign=False)["error"]["reason"] \
        == "bad_command_signature"
    assert _version(w) is None
    # a good one, and its replay (the nonce is remembered across a restart too)
    good = sign_request("deploy", {"request_id": "x2", "path": str(v1)}, priv, f"{SITE}/*")
    assert w.call("deploy", good, sign=False)["ok"]
    assert w.call("deploy", good, sign=False)["error"]["reason"] == "replayed_command"
    d.stop()
    start()
    assert w.call("deploy", good, sign=False)["error"]["reason"] == "replayed_command"
    assert _version(w) == ("tiny", 1)


def test_revoked_command_key_and_unsigned_bench_mode(agent, tmp_path):
    start, w = agent
    _, pub = keys(tmp_path)
    start(revoked_keys=[str(pub)])
    r = w.call("deploy", {"path": str(package(tmp_path, 1))})
    assert r["error"]["reason"] == "revoked_key"


def test_allow_unsigned_commands_still_needs_a_signature_to_force(agent, tmp_path):
    start, w = agent
    start(command_keys=[], allow_unsigned_commands=True)
    v1, v2 = package(tmp_path, 1), package(tmp_path, 2)
    assert w.call("deploy", {"path": str(v2)}, sign=False)["ok"]
    r = w.call("deploy", {"path": str(v1), "force": True}, sign=False)
    assert r["error"]["reason"] == "unsigned_command" and "force" in r["error"]["detail"]


# ---------------------------------------------------------------- 2. rollback protection that remembers


def test_rollback_protection_remembers_across_names_and_restarts(agent, tmp_path):
    start, w = agent
    d = start(max_version_jump=100)
    assert w.call("deploy", {"path": str(package(tmp_path, 6))})["ok"]
    assert w.call("deploy", {"path": str(package(tmp_path, 1, name="other"))})["ok"]
    r = w.call("deploy", {"path": str(package(tmp_path, 3))})  # used to be accepted: only the active was compared
    assert r["error"]["reason"] == "older_version", r
    d.stop()
    start(max_version_jump=100)
    assert w.call("deploy", {"path": str(package(tmp_path, 3))})["error"]["reason"] == "older_version"
    # a huge version is refused and does not block the next real one
    r = w.call("deploy", {"path": str(package(tmp_path, 2**53 - 1))})
    assert r["error"]["reason"] == "version_jump", r
    assert w.call("deploy", {"path": str(package(tmp_path, 7))})["ok"]
    # activate is checked too: the stored v6 is older than the v7 once installed
    v6 = next(m for m in w.call("list-models")["result"]["models"] if m["name"] == "tiny" and m["version"] == 6)
    assert w.call("activate", {"model": v6["id"]})["error"]["reason"] == "older_version"
    assert w.call("activate", {"model": v6["id"], "force": True})["ok"]  # a signed, deliberate downgrade
    assert _version(w) == ("tiny", 6)


def test_manifest_expiry_and_device_binding(agent, tmp_path):
    start, w = agent
    start()
    r = w.call("deploy", {"path": str(package(tmp_path, 1, expires="2001-01-01T00:00:00Z"))})
    assert r["error"]["reason"] == "expired"
    r = w.call("deploy", {"path": str(package(tmp_path, 2, devices=[f"{SITE}/someone-else"]))})
    assert r["error"]["reason"] == "wrong_device"
    r = w.call("deploy", {"path": str(package(tmp_path, 3, machine_ids=["0" * 32]))})
    assert r["error"]["reason"] == "wrong_device"
    r = w.call("deploy", {"path": str(package(tmp_path, 4, devices=[f"{SITE}/*"], expires="2999-01-01T00:00:00Z"))})
    assert r["ok"], r
    assert _version(w) == ("tiny", 4)


# ---------------------------------------------------------------- 5. fetch limits, bad paths


class _Slow(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):  # noqa: ANN002
        pass

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://localhost:9/elsewhere.ppk")  # another host
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(100):  # a byte now and then: never finishes in time
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)


@contextlib.contextmanager
def _server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_fetch_allowed_hosts_redirects_deadline_and_cleanup(agent, tmp_path):
    start, w = agent
    start(fetch_allowed_hosts=["127.0.0.1"], fetch_timeout_s=1.0)
    staging = tmp_path / "state" / "staging"
    with _server() as port:
        r = w.call("deploy", {"url": f"http://localhost:{port}/x.ppk"})  # not in the list (by name)
        assert r["error"]["reason"] == "host_not_allowed"
        r = w.call("deploy", {"url": "http://169.254.169.254/latest/meta-data"})
        assert r["error"]["reason"] == "host_not_allowed"
        r = w.call("deploy", {"url": f"http://127.0.0.1:{port}/redirect"})
        assert r["error"]["reason"] == "fetch_failed" and "redirect" in r["error"]["detail"]
        t0 = time.monotonic()
        r = w.call("deploy", {"url": f"http://127.0.0.1:{port}/slow.ppk"})
        assert r["error"]["reason"] == "fetch_timeout", r
        assert time.monotonic() - t0 < 15  # bounded by the deadline, not by the trickle (20 s)
    assert list(staging.iterdir()) == []  # nothing left behind by any failure
    assert w.call("ping")["ok"]


def test_bad_paths_are_bad_requests(agent, tmp_path):
    start, w = agent
    start()
    for path in ("/tmp/a\x00b.ppk", "/proc/self/environ", "/sys/kernel/x", "/dev/zero", "x" * 5000):
        r = w.call("deploy", {"path": path})
        assert r["error"]["reason"] == "bad_request", (path[:30], r)
        r = w.call("profile", {"path": path})
        assert r["error"]["reason"] == "bad_request", (path[:30], r)
    r = w.call("deploy", {"url": "file:///proc/self/environ"})
    assert r["error"]["reason"] == "bad_request"
    assert w.call("ping")["ok"]


def test_profile_of_a_file_verifies_like_deploy(agent, tmp_path):
    start, w = agent
    start()
    from prune_pack.agent.writer import write_package
    from test_mqtt_helpers import TINY

    unsigned = write_package(TINY, {"name": "tiny", "precision": "fp32", "version": 1}, tmp_path / "u.ppk", None)
    assert w.call("profile", {"path": str(unsigned)})["error"]["reason"] == "unsigned"
    r = w.call("profile", {"path": str(TINY)})  # a bare ONNX file is not a package
    assert r["error"]["reason"] == "not_a_package", r
    r = w.call("profile", {"path": str(package(tmp_path, 1)), "runs": 2, "warmup": 0})
    assert r["ok"] and r["result"]["model"]["signed"] is True


def test_answers_carry_json_schema_valid_errors(agent, tmp_path):
    start, w = agent
    start()
    r = w.call("deploy", {"path": str(tmp_path / "none.ppk")})
    assert r["error"]["reason"] == "not_a_package"
    assert json.dumps(r)  # validated by the Watcher against cmd-result.json


def test_command_queue_overflow_is_answered_and_counted(agent, tmp_path):
    """A burst beyond the slow lane's 16 places: every request answered (``busy`` for the
    overflow), the overflow counted in telemetry's health (it used to vanish uncounted)."""
    start, w = agent
    d = start()
    v1 = package(tmp_path, 1)
    n = 24
    with d.daemon._model_lock:  # the slow worker blocks on its first command: the queue fills deterministically
        first = w.mark()
        for i in range(n):
            w.publish("deploy", sign_request("deploy", {"request_id": f"burst-{i}", "path": str(v1)}, keys(tmp_path)[0],
                                             f"{SITE}/{DEV}"))
        # the overflow is answered at once, while the lane is still blocked
        w.wait_for(lambda t, b: sum(1 for m in w.messages[first:] if m[0].endswith("/cmd/deploy/res")) >= n - 17,
                   start=first)
    answers = {}
    for i in range(n):
        r = w.wait_for(lambda t, b, i=i: t.endswith("/cmd/deploy/res") and b.get("request_id") == f"burst-{i}", start=first)[1]
        answers[i] = r
    busy = [i for i, r in answers.items() if not r["ok"] and r["error"]["reason"] == "busy"]
    assert len(busy) == n - 17, answers  # one running + 16 queued
    health = w.wait_for(lambda t, b: t.endswith("/telemetry") and b.get("health", {}).get("commands_busy", 0) >= len(busy),
                        start=first)[1]["health"]
    assert health["commands_busy"] == len(busy) and health["commands_unanswered"] == 0


def test_a_revoked_package_key_stops_stored_models(broker, tmp_path):
    """Package and command keys apart (the fleet setup): after the package key is revoked, the
    model it signed is no longer served at start, nor activated or rolled back to."""
    import test_mqtt_helpers as H

    cmd_priv, cmd_pub = generate_keypair(tmp_path / "command-key")
    pkg_pub = keys(tmp_path)[1]
    w = Watcher(broker)
    cfg = agent_config(tmp_path, broker, command_keys=[str(cmd_pub)])
    H.COMMAND_KEY[0] = cmd_priv
    d = InProcessDaemon(cfg)
    try:
        w.status("online")
        assert w.call("deploy", {"path": str(package(tmp_path, 1))})["ok"]
        assert w.call("deploy", {"path": str(package(tmp_path, 2))})["ok"]
    finally:
        d.stop()
    cfg["agent"]["revoked_keys"] = [str(pkg_pub)]
    mark = w.mark()
    d = InProcessDaemon(cfg)
    try:
        st = w.status("online", start=mark)
        assert st["model"] is None  # neither v2 nor v1 verifies any more
        models = w.call("list-models")["result"]["models"]
        assert len(models) == 2
        r = w.call("activate", {"model": models[0]["id"], "force": True})
        assert r["error"]["reason"] == "untrusted_key", r
    finally:
        d.stop()
        w.close()
    assert not w.invalid, w.invalid
