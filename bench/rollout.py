"""Fleet rollout at scale: one signed package to N simulated devices (deploy.fleetsim: the real
agent's MQTT link, command handling, store and status code; stub inference) on one local
Mosquitto, canary 5, batches of 10 %, 2 % of the devices offline, one PC model that misses the
gate. Measures the rollout's wall time, the broker's CPU (psutil on the mosquitto process), the
messages the broker handled ($SYS counters), the final state of every device (read from its store
on disk and its request record), and ``prune-pack devices`` over N retained statuses.

    PYTHONPATH=.pp /work/main/.venv/bin/python bench/rollout.py [--devices 500] [--procs 4] [--soak 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from _broker import start_broker  # bench/_broker.py (scripts run as python bench/NAME.py)

REPO = Path(__file__).resolve().parent.parent
PCS = {  # simulated PC models: the p95 each reaches, streams per device
    "ipc-gen4": {"latency_ms": 15.0, "streams": 2},
    "ipc-gen3": {"latency_ms": 24.0, "streams": 1},
    "ipc-headless": {"latency_ms": 18.0, "streams": 0},  # no streams: gated on the deploy's profile
    "ipc-gen2": {"latency_ms": 55.0, "streams": 1},  # misses the 40 ms gate
}


class SysCounters:
    """The broker's own message counters ($SYS, refreshed every second)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho

        self.values: dict[str, int] = {}
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-sys")
        self.c.username_pw_set("host", "host-secret")
        self.c.on_message = lambda c, u, m: self.values.__setitem__(m.topic.split("broker/", 1)[1], int(float(m.payload)))
        self.c.on_connect = lambda c, *a: c.subscribe([("$SYS/broker/messages/received", 0), ("$SYS/broker/messages/sent", 0)])
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def snapshot(self) -> dict[str, int]:
        time.sleep(1.2)  # the next $SYS refresh
        return dict(self.values)


def make_packages(tmp: Path) -> tuple[Path, Path, Path, Path]:
    from prune_pack.agent.package import generate_keypair, write_package

    spec = importlib.util.spec_from_file_location("make_tiny_onnx", REPO / "tests" / "data" / "make_tiny_onnx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    import onnx

    onnx_path = tmp / "tiny.onnx"
    onnx.save(mod.build(), str(onnx_path))
    priv, pub = generate_keypair(tmp / "keys")
    v1 = write_package(onnx_path, {"name": "line-detector", "precision": "fp32", "version": 1}, tmp / "v1.ppk", priv)
    v2 = write_package(onnx_path, {"name": "line-detector", "precision": "fp32", "version": 2,
                                   "target": {"latency_ms": 40.0, "percentile": "p95"}}, tmp / "v2.ppk", priv)
    return v1, v2, priv, pub


def fleet_spec(n: int) -> tuple[list[tuple[str, str, str]], list[str]]:
    devices, offline = [], []
    for i in range(n):
        site = f"line{i % 5 + 1}"
        dev = f"ipc-{i:04d}"
        pc = "ipc-gen2" if i % 25 == 24 else ("ipc-headless" if i % 10 == 3 else ("ipc-gen3" if i % 2 else "ipc-gen4"))
        devices.append((site, dev, pc))
        if i % 50 == 7:
            offline.append(f"{site}/{dev}")
    return devices, offline


def cli(args: list[str], env: dict, timeout: float = 1800) -> tuple[float, dict, str]:
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "prune_pack.cli", *args, "--json"], env=env, capture_output=True,
                       text=True, timeout=timeout)
    wall = time.monotonic() - t
    out = p.stdout.strip().splitlines()
    if p.returncode not in (0, 9) or not out:
        raise RuntimeError(f"{args[0]} failed ({p.returncode}): {p.stderr[-3000:]}")
    return wall, json.loads(out[-1]), p.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--procs", type=int, default=4, help="simulator processes")
    ap.add_argument("--soak", type=float, default=5.0)
    ap.add_argument("--telemetry", type=float, default=2.0, help="simulated devices' telemetry interval (s)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "rollout.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pp-rollout-bench-"))
    broker, port = start_broker(
        tmp, {"device": "device-secret", "host": "host-secret"},
        "user device\ntopic readwrite prunepack/#\n\nuser host\ntopic readwrite prunepack/#\ntopic read $SYS/#\n",
        "sys_interval 1\nmax_queued_messages 100000\n")
    procs: list[subprocess.Popen] = []
    try:
        v1, v2, priv, pub = make_packages(tmp)
        (tmp / "device.pw").write_text("device-secret\n")
        (tmp / "host.pw").write_text("host-secret\n")
        devices, offline = fleet_spec(args.devices)
        env = {**os.environ, "PRUNE_PACK_COMMAND_KEY": str(priv)}  # the host signs commands
        t0 = time.monotonic()
        for k in range(args.procs):
            part = devices[k::args.procs]
            spec = {"root": str(tmp / "fleet"), "broker": f"mqtt://127.0.0.1:{port}", "username": "device",
                    "password_file": str(tmp / "device.pw"), "trusted_keys": [str(pub)], "pcs": PCS,
                    "devices": part, "telemetry_interval_s": args.telemetry, "seed": str(v1), "command_keys": [str(pub)],
                    "offline": [f"{s}/{d}" for s, d, _ in part if f"{s}/{d}" in offline]}
            (tmp / f"fleet{k}.json").write_text(json.dumps(spec))
            procs.append(subprocess.Popen([sys.executable, "-m", "prune_pack.deploy.fleetsim", str(tmp / f"fleet{k}.json")],
                                          env=env, stdout=subprocess.PIPE, stderr=open(tmp / f"fleet{k}.log", "w"), text=True))
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != "ready":
                raise RuntimeError(f"simulator failed: {(tmp / 'fleet0.log').read_text()[-2000:]}")
        fleet_up_s = time.monotonic() - t0
        sim_rss = sum(psutil.Process(p.pid).memory_info().rss for p in procs) / 2**20
        (tmp / "host.yaml").write_text(yaml.safe_dump({
            "mqtt": {"broker": f"mqtt://127.0.0.1:{port}", "username": "host", "password_file": str(tmp / "host.pw")},
            "rollout": {"state_dir": str(tmp / "rollouts"), "deploy_timeout_s": 120.0}}))
        cfg = ["--config", str(tmp / "host.yaml")]
        time.sleep(args.telemetry + 1)
        dev_walls = []
        for _ in range(3):
            w, dv, _ = cli(["devices", *cfg, "--wait", "10"], env)
            dev_walls.append(w)
        seen = len(dv["devices"])
        sysc = SysCounters(port)
        bp = psutil.Process(broker.pid)
        sys0, bcpu0 = sysc.snapshot(), sum(bp.cpu_times()[:2])
        sim_cpu0 = sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs)
        wall, res, stderr = cli(["rollout", str(v2), "--devices", "line*/*", "--canary", "5", "--batch", "10%",
                                 "--max-failures", "5%", "--gate", "p95<=40", "--soak", str(args.soak), *cfg], env)
        bcpu = sum(bp.cpu_times()[:2]) - bcpu0
        sim_cpu = sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs) - sim_cpu0
        sys1 = sysc.snapshot()
        report = check(tmp, devices, offline, res)
        msgs = {k: sys1.get(k, 0) - sys0.get(k, 0) for k in sys1}
        result = {"devices": args.devices, "offline": len(offline), "gen2": sum(1 for d in devices if d[2] == "ipc-gen2"),
                  "sim_procs": args.procs, "fleet_up_s": round(fleet_up_s, 1), "sim_rss_mb": round(sim_rss),
                  "devices_cmd_s": [round(w, 2) for w in dev_walls], "devices_seen": seen,
                  "rollout_wall_s": round(wall, 1), "rollout_state": res["state"], "counts": res["counts"],
                  "broker_cpu_s": round(bcpu, 2), "broker_cpu_pct": round(100 * bcpu / wall, 1),
                  "sim_cpu_s": round(sim_cpu, 1), "messages": msgs, "soak_s": args.soak,
                  "telemetry_interval_s": args.telemetry, **report}
        print(json.dumps(result, indent=1))
        write_md(Path(args.out), result, args)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def check(tmp: Path, devices: list[tuple[str, str, str]], offline: list[str], res: dict) -> dict:
    """Every device's final state from its own disk: the store's active version and the deploy /
    rollback requests it received."""
    from prune_pack.deploy.fleetsim import active_version, device_record

    wrong, double = [], []
    for site, dev, pc in devices:
        name = f"{site}/{dev}"
        sd = tmp / "fleet" / site / dev
        cmds = [r["cmd"] for r in device_record(sd)]
        ver = active_version(sd)
        if cmds.count("deploy") > 1:
            double.append(name)
        want = ([], 1) if name in offline else ((["deploy", "rollback"], 1) if pc == "ipc-gen2" else (["deploy"], 2))
        got_result = res["devices"].get(name, {}).get("result")
        want_result = "skipped" if name in offline else ("rolled_back" if pc == "ipc-gen2" else "passed")
        if (cmds, ver) != want or got_result != want_result:
            wrong.append({"device": name, "pc": pc, "cmds": cmds, "active_version": ver, "result": got_result})
    return {"wrong_final_state": len(wrong), "double_deploys": len(double), "wrong_examples": wrong[:5]}


def cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        d = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in out.splitlines() if ":" in l)}
        return f"{d.get('Model name')} (family {d.get('CPU family')}, model {d.get('Model')}), {os.cpu_count()} cores"
    except OSError:
        return platform.processor()


def write_md(path: Path, r: dict, args: argparse.Namespace) -> None:
    m = r["messages"]
    path.write_text(
        f"# Rollout to {r['devices']} simulated devices ({time.strftime('%Y-%m-%d', time.gmtime())})\n\n"
        f"`PYTHONPATH=.pp /work/main/.venv/bin/python bench/rollout.py --devices {args.devices} --procs {args.procs} "
        f"--soak {args.soak:g} --telemetry {args.telemetry:g}`\n\nCPU: {cpu_line()}; shared machine.\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| devices (offline / failing PC model) | {r['devices']} ({r['offline']} / {r['gen2']} ipc-gen2 at 55 ms vs gate 40 ms) |\n"
        f"| simulator | {r['sim_procs']} processes, {r['sim_rss_mb']} MiB RSS, up in {r['fleet_up_s']} s, "
        f"telemetry every {r['telemetry_interval_s']:g} s |\n"
        f"| `prune-pack devices` over {r['devices_seen']} retained statuses (3 runs, s, process start included) | "
        f"{', '.join(str(x) for x in r['devices_cmd_s'])} |\n"
        f"| rollout wall time (canary 5, batches 10 %, soak {r['soak_s']:g} s per wave) | {r['rollout_wall_s']} s |\n"
        f"| rollout result | {r['rollout_state']}: {json.dumps(r['counts'])} |\n"
        f"| broker CPU during the rollout | {r['broker_cpu_s']} s ({r['broker_cpu_pct']} % of one core) |\n"
        f"| simulator CPU during the rollout | {r['sim_cpu_s']} s |\n"
        f"| broker PUBLISH messages received / sent during the rollout ($SYS/broker/messages/*) | {m.get('messages/received')} / {m.get('messages/sent')} |\n"
        f"| devices in a wrong final state / deployed twice | {r['wrong_final_state']} / {r['double_deploys']} |\n")


if __name__ == "__main__":
    main()
