"""The monitoring bundle with real parts: real agents publish telemetry/2 over a real Mosquitto,
``prune-pack exporter`` serves it, ``promtool`` checks the output and unit-tests every alert rule,
a real Prometheus scrapes the exporter and answers ``histogram_quantile`` with the p95 the devices
reported, loads the alert rules, and evaluates every query of the Grafana dashboard."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from fleet_helpers import (
    REPO,
    TARGET_MS,
    Prometheus,
    host_mqtt,
    http_get,
    need_binary,
    publish_rollout_state,
    start_agents,
    stop_cli,
    wait_until,
)
from test_mqtt_helpers import Watcher, check_message

from prune_pack.agent.metrics import LATENCY_BUCKETS_S, histogram_quantile

RULES = REPO / "monitoring" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "dashboards" / "prunepack-fleet.json"
DEVICES = [("lab", "dev1"), ("line3", "dev2")]


def test_promtool_unit_tests_every_alert_rule():
    promtool = need_binary("promtool", "prometheus")
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=RULES.parent, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # every alert has a test that expects it to fire and one that expects it quiet
    import yaml

    alerts = _alert_names()
    tests = yaml.safe_load((RULES.parent / "alerts.test.yml").read_text())["tests"]
    fired = {t["alertname"] for g in tests for t in g["alert_rule_test"] if t["exp_alerts"]}
    quiet = {t["alertname"] for g in tests for t in g["alert_rule_test"] if not t["exp_alerts"]}
    assert alerts == fired == quiet, (alerts, fired, quiet)


def _alert_names() -> set[str]:
    import yaml

    return {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}


def _exporter(broker, tmp_path):
    from prune_pack.deploy.exporter import Exporter

    ex = Exporter(host_mqtt(broker, tmp_path, "viewer"), "127.0.0.1:0").start()
    wait_until(ex.client.connected.is_set, 10, "the exporter to connect")
    return ex


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target and template variable, with Grafana's variables filled in."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"]["query"])
            assert m, v
            out.append((f"variable {v['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    subst = {"$__rate_interval": "1m", "$__range": "1m", "$site": ".*", "$device": ".*"}
    filled = []
    for title, expr in out:
        for k, val in subst.items():
            expr = expr.replace(k, val)
        assert "$" not in expr, (title, expr)
        filled.append((title, expr))
    return filled


def test_exporter_prometheus_and_every_dashboard_query(broker, tmp_path):
    promtool = need_binary("promtool", "prometheus")
    w = Watcher(broker)
    ex = _exporter(broker, tmp_path)
    agents = start_agents(tmp_path, broker, DEVICES)
    prom = None
    try:
        def processed(d) -> int:
            dev = ex.state.get(f"{d[0]}/{d[1]}")
            return min((s["frames_processed"] for s in dev.streams()), default=0) if dev else 0

        wait_until(lambda: all(processed(d) >= 10 for d in DEVICES), 60, "10 processed frames per device")
        text = http_get(f"http://127.0.0.1:{ex.port}/metrics")
        (tmp_path / "metrics.txt").write_text(text)
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        for site, dev in DEVICES:
            assert f'prunepack_device_up{{device="{dev}",site="{site}"}} 1.0' in text
            assert f'prunepack_latency_target_seconds{{device="{dev}",site="{site}"}} {TARGET_MS / 1000}' in text
            assert re.search(rf'prunepack_model_info{{.*device="{dev}".*name="tiny".*}} 1\.0', text)
            assert f'prunepack_agent_degraded{{device="{dev}",site="{site}"}} 0.0' in text  # telemetry health
            assert re.search(rf'prunepack_inference_latency_seconds_bucket{{device="{dev}",le="\+Inf",site="{site}",stream="cam1"}} \d+', text)

        publish_rollout_state(broker, "r1", {"lab/dev1": "passed", "line3/dev2": "deployed", "lab/dev9": "pending"})
        wait_until(lambda: 'prunepack_rollout_devices{phase="passed",rollout="r1"} 1.0'
                   in http_get(f"http://127.0.0.1:{ex.port}/metrics"), 10, "the rollout in the exporter")
        prom = Prometheus(tmp_path, f"127.0.0.1:{ex.port}", rules=RULES)
        # a few scrapes while the agents run, so rate() has points to work with
        wait_until(lambda: len(prom.query("count_over_time(prunepack_frames_processed_total[1m]) >= 4")) == 2,
                   60, "4 scrapes of both devices")
        for d in agents:  # clean stop: the last telemetry stays, the retained status says offline
            d.stop()
        agents = []
        wait_until(lambda: len(prom.query("prunepack_device_state{state='offline'} == 1")) == 2, 30,
                   "prometheus to see both devices offline")

        for site, dev in DEVICES:
            held = ex.state.get(f"{site}/{dev}")
            (s,) = held.streams()
            h = s["latency_seconds"]
            assert h["bounds"] == list(LATENCY_BUCKETS_S) and h["count"] == s["frames_processed"] > 0
            want = histogram_quantile(0.95, h["bounds"], h["counts"], h["count"])
            (got,) = prom.query(f'histogram_quantile(0.95, sum by (le) '
                                f'(prunepack_inference_latency_seconds_bucket{{site="{site}",device="{dev}"}}))')
            assert float(got["value"][1]) == pytest.approx(want, rel=1e-9), (site, dev)
            # The device's own p95 (over its last 256 frames: all of them here) lies in the same
            # bucket as Prometheus' estimate, or in a neighbouring one when it sits on a bound.
            dev_p95 = s["latency_ms"]["p95"] / 1000
            edges = [0.0, *LATENCY_BUCKETS_S, float("inf")]
            i = next(k for k in range(1, len(edges)) if want <= edges[k])
            assert edges[max(0, i - 2)] <= dev_p95 <= edges[min(len(edges) - 1, i + 1)], (dev_p95, want)

        for title, expr in _dashboard_queries():
            assert prom.query(expr), f"panel {title!r}: no data for {expr}"

        def rules_ok() -> bool:
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return len(rules) == len(_alert_names()) and all(r["health"] == "ok" for r in rules)

        wait_until(rules_ok, 30, "the alert rules to be evaluated without errors")
    finally:
        for d in agents:
            d.stop()
        if prom is not None:
            prom.stop()
        ex.stop()
        w.close()
    device_invalid = [x for x in w.invalid if "/_rollout/" not in x]  # the host's rollout state is not a device message
    assert not device_invalid, device_invalid


def _telemetry(site: str, dev: str, session: int, seq: int, processed: int, cpu: float, historical: bool = False) -> dict:
    """A telemetry/2 message as an agent sends it (validated against the shipped schema below)."""
    counts = [0] * len(LATENCY_BUCKETS_S)
    counts[LATENCY_BUCKETS_S.index(0.02):] = [processed] * (len(LATENCY_BUCKETS_S) - LATENCY_BUCKETS_S.index(0.02))
    body = {
        "schema": "telemetry/2", "device_id": dev, "site": site, "session": session, "seq": seq,
        "ts_ms": int(time.time() * 1000), "cpu_percent": cpu, "system_cpu_percent": 10.0, "rss_mb": 100.0,
        "load": [0.1, 0.1, 0.1], "temperature_c": None, "uptime_s": 10.0, "model": None,
        "streams": [{"stream": "cam1", "state": "up", "frames_read": processed, "frames_processed": processed,
                     "frames_dropped": 0, "dropped_by_reason": {"queue_full": 0}, "processed_fps": 5.0,
                     "latency_ms": {"p50": 15.0, "p95": 19.0, "p99": 19.5}, "detections_by_class": {"person": processed},
                     "latency_seconds": {"bounds": list(LATENCY_BUCKETS_S), "counts": counts, "count": processed,
                                         "sum": processed * 0.018}}],
        "queue": {"pending": 0, "dropped": 0}, "detections_dropped": 0, "inference": None,
    }
    if historical:
        body["historical"] = True
    return body


def test_historical_replays_never_move_values_backwards(broker, tmp_path):
    ex = _exporter(broker, tmp_path)
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fake-device")
    pub.username_pw_set("device", broker.users["device"])
    pub.connect(broker.host, broker.port)
    pub.loop_start()

    def send(body: dict) -> None:
        topic = f"prunepack/{body['site']}/{body['device_id']}/telemetry"
        check_message(topic, body)
        pub.publish(topic, json.dumps(body), qos=1).wait_for_publish(5)

    def metric(name: str) -> float:
        m = re.search(rf'^{name}{{device="d9",site="s9"(?:,stream="cam1")?}} (\S+)$',
                      http_get(f"http://127.0.0.1:{ex.port}/metrics"), re.M)
        return float(m.group(1)) if m else float("nan")

    try:
        send(_telemetry("s9", "d9", session=5, seq=10, processed=100, cpu=50.0))
        wait_until(lambda: metric("prunepack_frames_processed_total") == 100, 10, "the live telemetry")
        # A replay from the offline queue (older session), then an at-least-once duplicate: both ignored.
        send(_telemetry("s9", "d9", session=4, seq=3, processed=20, cpu=10.0, historical=True))
        send(_telemetry("s9", "d9", session=5, seq=10, processed=90, cpu=11.0))
        send(_telemetry("s9", "d9", session=5, seq=11, processed=120, cpu=60.0))  # newer: taken
        wait_until(lambda: metric("prunepack_frames_processed_total") == 120, 10, "the newer telemetry")
        assert metric("prunepack_cpu_percent") == 60.0
        assert metric("prunepack_inference_latency_seconds_count") == 120
        with ex.state.lock:
            assert ex.state.counts["older_ignored"] == 2
        # A live message from a device whose session counter restarted (state folder reset): taken.
        send(_telemetry("s9", "d9", session=1, seq=1, processed=3, cpu=5.0))
        wait_until(lambda: metric("prunepack_frames_processed_total") == 3, 10, "the restarted device")
        # Decommissioned: the operator clears the retained status; the device leaves /metrics.
        pub.publish("prunepack/s9/d9/status", b"", qos=1, retain=True).wait_for_publish(5)
        wait_until(lambda: 'device="d9"' not in http_get(f"http://127.0.0.1:{ex.port}/metrics"), 10,
                   "the cleared device to leave /metrics")
    finally:
        pub.disconnect()
        pub.loop_stop()
        ex.stop()


def test_cli_exporter_serves_and_stops_on_sigterm(broker, tmp_path):
    """``prune-pack exporter`` as a real process: config + flags, /metrics served, clean SIGTERM."""
    import signal
    import sys

    import yaml

    from conftest import free_port

    port = free_port()
    pw = tmp_path / "viewer.pw"
    pw.write_text(broker.users["viewer"])
    cfg = tmp_path / "host.yaml"
    cfg.write_text(yaml.safe_dump({"mqtt": {"broker": "mqtt://127.0.0.1:1", "username": "viewer",
                                            "password_file": str(pw)}, "exporter": {"listen": "127.0.0.1:1"}}))
    proc = subprocess.Popen([sys.executable, "-m", "prune_pack.cli", "exporter", "--config", str(cfg), "--broker", broker.url,
                             "--listen", f"127.0.0.1:{port}", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        text = wait_until(lambda: _try_get(f"http://127.0.0.1:{port}/metrics"), 30, "the exporter's /metrics")
        assert "prunepack_exporter_messages_total" in text
        wait_until(lambda: "prunepack_exporter_broker_connected 1.0" in _try_get(f"http://127.0.0.1:{port}/metrics"),
                   15, "the exporter to connect (the --broker flag wins over the config)")
        assert stop_cli(proc)["devices"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _try_get(url: str) -> str:
    try:
        return http_get(url, 1.0)
    except OSError:
        return ""


def test_agent_own_metrics_endpoint(broker, tmp_path):
    """``agent.metrics_listen``: the agent serves its own /metrics with the exporter's names."""
    from conftest import free_port
    from fleet_helpers import device_config, deploy, target_package
    from test_mqtt_helpers import InProcessDaemon

    promtool = need_binary("promtool", "prometheus")
    port = free_port()
    cfg = device_config(tmp_path, broker, "lab", "self-scraped")
    cfg["agent"]["metrics_listen"] = f"127.0.0.1:{port}"
    d = InProcessDaemon(cfg)
    try:
        wait_until(lambda: d.daemon.link.connected, 20, "the agent to connect")
        deploy(broker, tmp_path, "lab", "self-scraped", target_package(tmp_path))
        lab = 'device="self-scraped",site="lab"'
        count = re.compile(rf'^prunepack_inference_latency_seconds_count{{{lab},stream="cam1"}} (\S+)$', re.M)

        def text_with_frames() -> str:
            t = _try_get(f"http://127.0.0.1:{port}/metrics")
            m = count.search(t)
            return t if m and float(m.group(1)) >= 3 else ""

        text = wait_until(text_with_frames, 30, "3 frames in the agent's own histogram")
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"prunepack_device_up{{{lab}}} 1.0" in text
        assert f"prunepack_latency_target_seconds{{{lab}}} {TARGET_MS / 1000}" in text
        assert re.search(rf'^prunepack_frames_processed_total{{{lab},stream="cam1"}} [1-9]', text, re.M)
    finally:
        d.stop()
    with pytest.raises(OSError):  # stopped with the agent
        http_get(f"http://127.0.0.1:{port}/metrics", 1.0)
