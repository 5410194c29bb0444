"""``prune-pack dashboard`` in a real headless Chromium against a real Mosquitto and real agents
(two in this process, one a real process that is SIGKILLed): every device in the table, the
killed agent's row shows ``lost`` within 1.5 x keepalive, the p95 cell updates live with values
the devices published, the chart draws against the target, and a screenshot is saved."""

from __future__ import annotations

import os
import shutil
import time

from browser import Chromium
from fleet_helpers import (
    TARGET_MS,
    deploy,
    device_config,
    host_mqtt,
    publish_rollout_state,
    start_agents,
    stop_cli,
    target_package,
    wait_until,
)
from test_mqtt_helpers import DaemonProcess, Watcher

KEEPALIVE_S = 5

ROWS = "JSON.stringify([...document.querySelectorAll('#fleet tbody tr[data-key]')].map(tr => ({key: tr.dataset.key, " \
       "state: tr.querySelector('[data-col=state]').textContent, p95: tr.querySelector('[data-col=p95]').textContent, " \
       "model: tr.querySelector('[data-col=model]').textContent})))"


def rows(browser: Chromium) -> dict[str, dict]:
    import json

    return {r["key"]: r for r in json.loads(browser.eval(ROWS) or "[]")}


def test_dashboard_in_headless_chromium(broker, tmp_path):
    from prune_pack.deploy.dashboard import Dashboard

    w = Watcher(broker)
    db = Dashboard(host_mqtt(broker, tmp_path, "viewer"), "127.0.0.1:0").start()
    agents = start_agents(tmp_path, broker, [("lab", "dev1"), ("lab", "dev2")])
    cfg = device_config(tmp_path, broker, "line3", "cam-pc", keepalive_s=KEEPALIVE_S)
    proc = DaemonProcess(tmp_path, cfg, tag="-cam-pc")
    browser = None
    try:
        wait_until(lambda: any(t == "prunepack/line3/cam-pc/status" and b.get("state") == "online"
                               for t, b, _ in w.device_messages()), 60, "the agent process online")
        deploy(broker, tmp_path, "line3", "cam-pc", target_package(tmp_path))
        browser = Chromium(tmp_path)
        browser.open(f"http://127.0.0.1:{db.port}/?device=lab/dev1")
        keys = {"lab/dev1", "lab/dev2", "line3/cam-pc"}
        got = wait_until(lambda: (r := rows(browser)) and set(r) == keys and all(x["state"] == "online" for x in r.values())
                         and all("tiny v1" in x["model"] for x in r.values()) and r, 30, "every device online in the table")

        # the p95 cell follows the telemetry: a new value, one that lab/dev1 published
        first = got["lab/dev1"]["p95"]
        assert first.endswith(f"/ {TARGET_MS:.0f}"), first
        changed = wait_until(lambda: (p := rows(browser)["lab/dev1"]["p95"]) != first and p.split(" /")[0] != "-" and p,
                             30, "the p95 cell to update")
        published = {f"{s['latency_ms']['p95']:.2f}" for t, b, _ in w.device_messages()
                     if t == "prunepack/lab/dev1/telemetry" for s in b["streams"] if s["latency_ms"]["p95"] is not None}
        assert changed.split(" /")[0] in published, (changed, sorted(published)[:5])

        # the rollout in progress, from prune-pack rollout's retained state
        publish_rollout_state(broker, "r7", {"lab/dev1": "passed", "lab/dev2": "deployed", "line3/cam-pc": "pending"})
        text = wait_until(lambda: browser.eval("document.querySelector('#rollouts [data-rollout=r7]')?.textContent"),
                          10, "the rollout on the page")
        assert text == "r7 (running): tiny v2 to 3 devices, gate p95 <= 40 ms: deployed 1, passed 1, pending 1", text

        # the chart: the selected device, one p95 series per stream plus the target line
        wait_until(lambda: browser.eval("typeof plot !== 'undefined' && plot !== null && plot.data[0].length >= 2"),
                   20, "the latency chart")
        assert browser.eval("plot.series.map(s => s.label).slice(1)") == ["cam1 p95 (ms)", "target (ms)"]
        assert browser.eval("plot.data[2][0]") == TARGET_MS

        # SIGKILL: the broker publishes the Last Will; the row says lost within 1.5 x keepalive
        t0 = time.monotonic()
        proc.kill9()
        wait_until(lambda: rows(browser)["line3/cam-pc"]["state"] == "lost", 1.5 * KEEPALIVE_S,
                   "the killed agent's row to show lost", every=0.1)
        lost_after_s = time.monotonic() - t0
        states = {k: r["state"] for k, r in rows(browser).items()}
        assert states == {"lab/dev1": "online", "lab/dev2": "online", "line3/cam-pc": "lost"}, states

        shot = browser.screenshot(tmp_path / "dashboard.png")
        assert shot.stat().st_size > 10_000
        out = os.environ.get("PRUNE_PACK_SCREENSHOTS")
        if out:  # CI / a reviewer keeps it to look at
            os.makedirs(out, exist_ok=True)
            shutil.copy(shot, os.path.join(out, "dashboard.png"))
        print(f"lost shown {lost_after_s:.2f} s after SIGKILL; screenshot {shot}")
    finally:
        if browser is not None:
            browser.close()
        proc.ensure_dead()
        for d in agents:
            d.stop()
        db.stop()
        w.close()
    device_invalid = [x for x in w.invalid if "/_rollout/" not in x]  # the host's rollout state is not a device message
    assert not device_invalid, device_invalid


def test_cli_dashboard_serves_page_api_and_stops_on_sigterm(broker, tmp_path):
    import json
    import signal
    import subprocess
    import sys

    import yaml

    from conftest import free_port
    from fleet_helpers import http_get

    port = free_port()
    pw = tmp_path / "viewer.pw"
    pw.write_text(broker.users["viewer"])
    cfg = tmp_path / "host.yaml"
    cfg.write_text(yaml.safe_dump({"mqtt": {"broker": broker.url, "username": "viewer", "password_file": str(pw)},
                                   "dashboard": {"listen": f"127.0.0.1:{port}"}}))
    proc = subprocess.Popen([sys.executable, "-m", "prune_pack.cli", "dashboard", "--config", str(cfg), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def get(path: str) -> str:
        try:
            return http_get(f"http://127.0.0.1:{port}{path}", 2.0)
        except OSError:
            return ""

    try:
        page = wait_until(lambda: get("/"), 30, "the page")
        assert "/static/uPlot.iife.min.js" in page and "/static/dashboard.js" in page
        assert get("/static/uPlot.iife.min.js").startswith("/*! https://github.com/leeoniya/uPlot")
        assert json.loads(get("/api/fleet"))["devices"] == []
        assert stop_cli(proc)["devices"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
