"""The daemon as a real process (``python -m prune_pack.cli agent run``): Last Will on kill -9,
clean stop, sd_notify over a real socket, kill -9 in the middle of a deploy, and a broker that
goes away and comes back (nothing lost, replayed in order). Every device message is validated
against its JSON Schema."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections import defaultdict

import pytest

from test_mqtt_helpers import (
    BASE,
    DaemonProcess,
    NotifySocket,
    Watcher,
    agent_config,
    keys,
    package,
)


@pytest.fixture
def watcher(broker):
    w = Watcher(broker)
    yield w
    w.close()
    assert not w.invalid, w.invalid


def test_status_lifecycle_lwt_and_sd_notify(broker, watcher, tmp_path):
    sock = NotifySocket()
    cfg = agent_config(tmp_path, broker)
    p = DaemonProcess(tmp_path, cfg, env={"NOTIFY_SOCKET": sock.env, "WATCHDOG_USEC": "400000"})
    try:
        online = watcher.status("online", timeout=60)
        sock.collect_until(lambda m: any(x.startswith("READY=1") for x in m) and "WATCHDOG=1" in m)
        assert watcher.call("ping")["ok"]
        mark = watcher.mark()
        assert p.term() == 0  # clean stop
        off = watcher.status("offline", start=mark)
        assert off["session"] == online["session"] and off["seq"] > online["seq"]
        sock.collect_until(lambda m: "STOPPING=1" in m)
        assert "connected to" in p.tail() and "device-secret" not in p.tail()  # secrets never logged
    finally:
        p.ensure_dead()
        sock.close()

    # a retained command must not run again on every (re)connect: refused
    watcher.client.publish(f"{BASE}/cmd/rollback", '{"request_id": "stale"}', qos=1, retain=True).wait_for_publish(5)
    p = DaemonProcess(tmp_path, cfg, tag="2")
    try:
        online2 = watcher.status("online", timeout=60, start=watcher.mark())
        stale = watcher.wait_for(lambda t, b: t.endswith("/cmd/rollback/res") and b.get("request_id") == "stale")[1]
        assert stale["error"]["reason"] == "retained"
        watcher.client.publish(f"{BASE}/cmd/rollback", b"", qos=1, retain=True).wait_for_publish(5)
        assert online2["session"] > online["session"]  # the counter lives on disk
        mark = watcher.mark()
        p.kill9()
        lost = watcher.status("lost", timeout=30, start=mark)
        # the Last Will carries the envelope of the connection it was set on
        assert lost["session"] == online2["session"] and lost["seq"] == 0
    finally:
        p.ensure_dead()
    late = Watcher(broker)  # a dashboard that connects later sees the retained state
    try:
        st = late.wait_for(lambda t, b: t == f"{BASE}/status")
        assert st[1]["state"] == "lost" and late.messages[0][2] is True
    finally:
        late.close()


def test_kill9_during_deploy_then_restart(broker, watcher, tmp_path):
    cfg = agent_config(tmp_path, broker)
    v1, v2 = package(tmp_path, 1), package(tmp_path, 2)
    p = DaemonProcess(tmp_path, cfg)
    try:
        watcher.status("online", timeout=60)
        assert watcher.call("deploy", {"path": str(v1)})["ok"]
        p.term()
    finally:
        p.ensure_dead()
    for i, (point, expect) in enumerate([("verified", 1), ("stage_files", 1), ("before_switch", 1), ("after_switch", 2)]):
        mark = watcher.mark()
        p = DaemonProcess(tmp_path, cfg, env={"PRUNE_PACK_CRASH_AT": point}, tag=f"-{point}")
        try:
            watcher.status("online", timeout=60, start=mark)
            mark = watcher.mark()
            from prune_pack.agent.cmdauth import sign_request

            req = {"request_id": f"crash-{point}", "package_b64": base64.b64encode(v2.read_bytes()).decode()}
            watcher.publish("deploy", sign_request("deploy", req, keys(tmp_path)[0], BASE.split("/", 1)[1]))
            assert p.wait(60) == -9, p.tail()
            watcher.status("lost", start=mark)
        finally:
            p.ensure_dead()
        mark = watcher.mark()
        p = DaemonProcess(tmp_path, cfg, tag=f"-after-{point}")
        try:
            st = watcher.status("online", timeout=60, start=mark)
            assert st["model"] is not None and st["model"]["version"] == expect, (point, st, p.tail())
            r = watcher.call("profile", {"runs": 2})  # the active model really loads and runs
            assert r["ok"] and r["result"]["model"]["version"] == expect
            models = watcher.call("list-models")["result"]["models"]
            assert {m["version"] for m in models} <= {1, 2}
            assert not list((tmp_path / "state" / "staging").iterdir())
            p.term()
        finally:
            p.ensure_dead()


class GatedProxy:
    """A TCP forwarder between the daemon and the broker that can refuse new connections, so
    the test decides when the daemon may reconnect after the broker restarted (the watcher
    must be subscribed again first, or it would miss the replay)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.open = True
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            if not self.open:
                c.close()
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.srv.close()


def test_broker_outage_nothing_lost_replayed_in_order(broker, watcher, tmp_path):
    proxy = GatedProxy(broker.port)
    cfg = agent_config(tmp_path, broker, telemetry_interval_s=0.2)
    cfg["mqtt"]["broker"] = f"mqtt://127.0.0.1:{proxy.port}"
    p = DaemonProcess(tmp_path, cfg)
    try:
        _outage_scenario(p, proxy, broker, watcher, tmp_path)
    except AssertionError as e:
        tail = [(t, {k: b.get(k) for k in ("state", "session", "seq", "historical", "request_id")})
                for t, b, _ in watcher.messages[-12:] if isinstance(b, dict)]
        raise AssertionError(f"{e}\nlast messages: {tail}\nagent log:\n{p.tail()}") from None
    finally:
        p.ensure_dead()
        proxy.close()
    _check_nothing_lost(watcher)


def _outage_scenario(p, proxy, broker, watcher, tmp_path) -> None:
    watcher.status("online", timeout=60)
    assert watcher.call("deploy", {"path": str(package(tmp_path, 1))})["ok"]
    # a slow command whose answer is produced while the broker is down
    watcher.publish("profile", {"request_id": "during-outage", "seconds": 1.5, "warmup": 0})
    time.sleep(0.3)
    proxy.open = False
    broker.stop()
    time.sleep(3.0)
    broker.start()
    watcher.reconnect()
    proxy.open = True
    mark = watcher.mark()
    watcher.status("online", timeout=30, start=mark)
    res = watcher.wait_for(lambda t, b: t.endswith("/res") and b.get("request_id") == "during-outage", timeout=30)[1]
    assert res["ok"] and res.get("historical") is True
    # wait until the daemon produced live telemetry again after the replay
    watcher.wait_for(lambda t, b: t.endswith("/telemetry") and "historical" not in b, timeout=30, start=mark)
    assert watcher.call("ping")["ok"]
    p.term()


def _check_nothing_lost(watcher) -> None:
    msgs = [(t, b) for t, b, retain in watcher.device_messages() if isinstance(b, dict) and b.get("seq")]
    historical = [b for _, b in msgs if b.get("historical")]
    assert len([b for b in historical if b["schema"] == "telemetry/2"]) >= 5  # ~3 s of telemetry at 0.2 s
    # nothing lost: every session's messages arrive with seq 1..n without a gap (deduplicated)
    seqs = defaultdict(set)
    for _, b in msgs:
        seqs[b["session"]].add(b["seq"])
    for session, s in seqs.items():
        assert s == set(range(1, max(s) + 1)), (session, sorted(set(range(1, max(s) + 1)) - s))
    # in order: replayed messages come in (session, seq) order, before the new session's own
    keys = [(b["session"], b["seq"]) for b in historical]
    assert keys == sorted(keys)
    assert max(keys) < min((b["session"], b["seq"]) for b in (m[1] for m in msgs[-3:]))
