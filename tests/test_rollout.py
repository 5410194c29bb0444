"""Fleet rollout against a real Mosquitto and a simulated fleet of REAL agents (deploy.fleetsim:
the daemon's MQTT link, command handling, package verification, model store and status code;
only inference is stubbed, at a latency per simulated PC model). The host side runs through the
CLI (in-process, or as a real process killed with SIGKILL for the resume test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_mqtt_helpers import keys, package

from prune_pack.cli import main
from prune_pack.deploy.fleetsim import PcModel, SimFleet, active_version, device_record
from prune_pack.deploy.rollout_log import read_log

PCS = {"fast": PcModel("fast", 20.0), "slow": PcModel("slow", 60.0), "nostream": PcModel("nostream", 25.0, streams=0),
       "crashy": PcModel("crashy", 20.0, stream_errors=True)}


class Env:
    def __init__(self, broker, tmp: Path, devices: list[tuple[str, str]], offline: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        priv, pub = keys(tmp)
        os.environ["PRUNE_PACK_COMMAND_KEY"] = str(priv)  # the host signs deploy/rollback (monkeypatched)
        self.v1, self.v2 = package(tmp, 1), package(tmp, 2)
        (tmp / "device.pw").write_text("device-secret\n")
        (tmp / "host.pw").write_text("host-secret\n")
        self.fleet = SimFleet(tmp / "fleet", broker.url, "device", str(tmp / "device.pw"), [str(pub)], PCS,
                              [("lab", d, pc) for d, pc in devices], telemetry_interval_s=0.3,
                              command_keys=[str(pub)])
        self.fleet.seed(self.v1)
        self.fleet.start()
        self.fleet.wait_online(30)
        if offline:
            self.fleet.stop([f"lab/{d}" for d in offline])
        self.state = tmp / "rollouts"
        self.config = tmp / "host.yaml"
        self.config.write_text(yaml.safe_dump({
            "mqtt": {"broker": broker.url, "username": "host", "password_file": str(tmp / "host.pw")},
            "rollout": {"state_dir": str(self.state), "soak_s": 1.0, "deploy_timeout_s": 30.0,
                        "rollback_timeout_s": 20.0}}))

    def cli(self, *args: str, capsys=None) -> tuple[int, dict]:
        rc = main([*args, "--config", str(self.config), "--json"])
        out = capsys.readouterr().out.strip().splitlines()
        return rc, json.loads(out[-1]) if out else {}

    def sdir(self, dev: str) -> Path:
        return self.fleet.state_dir("lab", dev)

    def cmds(self, dev: str) -> list[str]:
        return [r["cmd"] for r in device_record(self.sdir(dev))]

    def log(self) -> list[dict]:
        (path,) = list(self.state.glob("*.jsonl"))
        return read_log(path)

    def close(self) -> None:
        self.fleet.stop()


@pytest.fixture
def env_factory(broker, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_PACK_COMMAND_KEY", "")  # restored after the test; set by Env
    made = []

    def make(devices, offline=()):
        made.append(Env(broker, tmp_path, devices, offline))
        return made[-1]

    yield make
    for e in made:
        e.close()


def test_canary_failure_stops_and_rolls_back_the_canary(env_factory, capsys):
    env = env_factory([("c1", "slow"), ("c2", "fast"), ("c3", "fast")])
    rc, res = env.cli("rollout", str(env.v2), "--devices", "lab/*", "--canary", "1", "--batch", "2",
                      "--gate", "p95<=40", capsys=capsys)
    assert rc == 9 and res["state"] == "aborted" and "canary" in res["why"]
    assert res["devices"]["lab/c1"]["result"] == "rolled_back" and res["devices"]["lab/c1"]["p95_ms"] == 60.0
    assert res["devices"]["lab/c2"]["result"] == "pending"
    assert env.cmds("c1") == ["deploy", "rollback"] and env.cmds("c2") == env.cmds("c3") == []
    assert active_version(env.sdir("c1")) == 1
    actions = [(e["action"], e["device"], e["result"]) for e in env.log()]
    assert actions == [("start", None, "planned"), ("deploy", "lab/c1", "ok"), ("gate", "lab/c1", "fail"),
                       ("rollback", "lab/c1", "ok"), ("abort", None, "aborting"), ("finish", None, "aborted")]
    assert all(e["by"] and e["ts_ms"] and e["package_sha256"] for e in env.log())


def test_threshold_abort_rolls_back_exactly_the_updated_devices(env_factory, capsys):
    env = env_factory([("a1", "fast"), ("a2", "slow"), ("a3", "nostream"), ("a4", "slow"), ("a5", "fast"),
                       ("a6", "fast"), ("a7", "fast")], offline=("a7",))
    rc, res = env.cli("rollout", str(env.v2), "--devices", "a*", "--canary", "1", "--batch", "2",
                      "--max-failures", "1", "--gate", "p95<=40", capsys=capsys)
    assert rc == 9 and res["state"] == "aborted" and "2 failures > max 1" in res["why"]
    r = {n.split("/")[1]: d["result"] for n, d in res["devices"].items()}
    assert r == {"a1": "rolled_back", "a2": "rolled_back", "a3": "rolled_back", "a4": "rolled_back",
                 "a5": "rolled_back", "a6": "pending", "a7": "skipped"}
    assert res["devices"]["lab/a3"]["p95_ms"] == 25.0  # no streams: the deploy's profile was gated
    for d in ("a1", "a2", "a3", "a4", "a5"):
        assert env.cmds(d) == ["deploy", "rollback"], d
        assert active_version(env.sdir(d)) == 1
    assert env.cmds("a6") == [] and active_version(env.sdir("a6")) == 1
    log = env.log()
    assert [e["device"] for e in log if e["action"] == "skip"] == ["lab/a7"]  # offline: reported, not waited on
    assert sorted(e["device"] for e in log if e["action"] == "rollback") == [f"lab/a{i}" for i in range(1, 6)]
    # prune-pack devices: model, live p95 and the rollout each device was in
    rc, dv = env.cli("devices", "--wait", "5", capsys=capsys)
    by = {f"{d['site']}/{d['device']}": d for d in dv["devices"]}
    assert by["lab/a2"]["rollout"].endswith(":rolled_back") and by["lab/a2"]["p95_ms"] == 60.0
    assert by["lab/a7"]["state"] == "offline" and by["lab/a1"]["model"]["version"] == 1
    assert by["lab/a1"]["target_ms"] == 40.0
    assert main(["devices", "--config", str(env.config)]) == 0  # the human table
    table = capsys.readouterr().out
    assert "P95/TARGET MS" in table and "60.0/40" in table and ":rolled_back" in table


def test_dry_run_touches_nothing(env_factory, capsys):
    env = env_factory([("d1", "fast"), ("d2", "fast"), ("d3", "slow"), ("d4", "fast")], offline=("d4",))
    rc, res = env.cli("rollout", str(env.v2), "--devices", "lab/d1,d3,@" + str(_ids(env.tmp, ["d2"])),
                      "--canary", "1", "--batch", "1", "--gate", "40", "--dry-run", capsys=capsys)
    assert rc == 0 and res["dry_run"] and res["waves"] == [["lab/d1"], ["lab/d2"], ["lab/d3"]]
    assert res["offline"] == []  # d4 was not selected
    assert all(env.cmds(d) == [] for d in ("d1", "d2", "d3", "d4"))
    assert not env.state.exists() or not list(env.state.iterdir())
    rc, st = env.cli("rollout", "status", capsys=capsys)
    assert st["rollouts"] == {}  # no retained rollout state either


def _ids(tmp: Path, ids: list[str]) -> Path:
    p = tmp / "ids.txt"
    p.write_text("# devices\n" + "\n".join(ids) + "\n")
    return p


def test_resume_after_sigkill_mid_batch_never_deploys_twice(env_factory, capsys):
    env = env_factory([("b1", "fast"), ("b2", "fast"), ("b3", "fast"), ("b4", "nostream")])
    cmd = [sys.executable, "-m", "prune_pack.cli", "rollout", str(env.v2), "--devices", "lab/b*", "--canary", "1",
           "--batch", "3", "--parallel", "1", "--gate", "p95<=40", "--config", str(env.config)]
    # Killed right after the device answered its deploy, before the host logged it (the worst moment).
    p = subprocess.run(cmd, env={**os.environ, "PRUNE_PACK_ROLLOUT_DIE_AT": "after_deploy:3"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    before = next(env.state.glob("*.jsonl")).read_bytes()
    logged = [(e["action"], e["device"]) for e in env.log()]
    assert logged == [("start", None), ("deploy", "lab/b1"), ("gate", "lab/b1"), ("deploy", "lab/b2")]
    assert env.cmds("b3") == ["deploy"] and active_version(env.sdir("b3")) == 2  # done on the device, not logged
    rid = env.log()[0]["rollout"]
    rc, st = env.cli("rollout", "status", rid, capsys=capsys)
    assert st["state"] == "running" and st["devices"]["lab/b3"] == "pending"
    rc, res = env.cli("rollout", "resume", rid, capsys=capsys)
    assert rc == 0 and res["state"] == "done", res
    assert all(d["result"] == "passed" for d in res["devices"].values())
    for d in ("b1", "b2", "b3", "b4"):
        assert env.cmds(d) == ["deploy"], d  # exactly one deploy command per device
        assert active_version(env.sdir(d)) == 2
    after = next(env.state.glob("*.jsonl")).read_bytes()
    assert after.startswith(before)  # append-only: the interrupted run's lines are untouched
    log = env.log()
    deploys = [e["device"] for e in log if e["action"] == "deploy"]
    assert sorted(deploys) == ["lab/b1", "lab/b2", "lab/b3", "lab/b4"]  # one line per action
    b3 = next(e for e in log if e["action"] == "deploy" and e["device"] == "lab/b3")
    assert "retained status" in b3["why"]
    assert [e["action"] for e in log][-1] == "finish" and any(e["action"] == "resume" for e in log)
    rc, again = env.cli("rollout", "resume", rid, capsys=capsys)
    assert rc == 2  # finished: nothing to resume


def test_stream_errors_fail_the_gate(env_factory, capsys):
    env = env_factory([("f1", "crashy"), ("f2", "fast")])
    rc, res = env.cli("rollout", str(env.v2), "--devices", "lab/*", "--gate", "p95<=40", capsys=capsys)
    assert rc == 9 and res["devices"]["lab/f1"]["result"] == "rolled_back"
    assert "new stream error" in res["devices"]["lab/f1"]["why"] and "rollback: confirmed" in res["devices"]["lab/f1"]["why"]
    gate = next(e for e in env.log() if e["action"] == "gate")
    assert gate["result"] == "fail" and "new stream error" in gate["why"] and gate["p95_ms"] == 20.0
    assert env.cmds("f2") == [] and active_version(env.sdir("f1")) == 1


def test_abort_with_no_process_running_rolls_back_from_the_log(env_factory, capsys):
    env = env_factory([("e1", "fast"), ("e2", "fast"), ("e3", "fast")])
    cmd = [sys.executable, "-m", "prune_pack.cli", "rollout", str(env.v2), "--devices", "e*", "--canary", "1",
           "--gate", "p95<=40", "--package-url", env.v2.resolve().as_uri(), "--config", str(env.config)]
    p = subprocess.run(cmd, env={**os.environ, "PRUNE_PACK_ROLLOUT_DIE_AT": "after_wave:1"}, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    rid = env.log()[0]["rollout"]
    assert active_version(env.sdir("e1")) == 2  # the canary (fetched by URL) passed before the host died
    assert env.log()[0]["package"]["url"].startswith("file://")
    rc, res = env.cli("rollout", "abort", rid, capsys=capsys)
    assert rc == 9 and res["state"] == "aborted" and res["why"] == "abort requested"
    assert env.cmds("e1") == ["deploy", "rollback"] and active_version(env.sdir("e1")) == 1
    assert env.cmds("e2") == env.cmds("e3") == []
    assert [e["action"] for e in env.log()][-3:] == ["abort", "rollback", "finish"]
    rc, st = env.cli("rollout", "status", capsys=capsys)
    assert st["rollouts"] == {rid: "aborted"}


def test_selectors_and_site_spread(tmp_path):
    from prune_pack.deploy.fleet import select, spread
    from prune_pack.errors import UserInputError

    def dev(site, d, name, version, state="online"):
        return {"site": site, "device": d, "status": {"state": state, "agent_version": "0.4",
                                                      "model": {"name": name, "version": version, "sha256": "ab" * 32}}}

    fleet = {f"{s}/{d}": dev(s, d, n, v, st) for s, d, n, v, st in [
        ("line1", "ipc-01", "yolo", 3, "online"), ("line1", "ipc-02", "yolo", 4, "online"),
        ("line2", "ipc-03", "yolo", 3, "lost"), ("line2", "cam-04", "other", 1, "online")]}
    assert select(fleet, "line1/*") == ["line1/ipc-01", "line1/ipc-02"]
    assert select(fleet, "ipc-*,model=yolo,version=3") == ["line1/ipc-01", "line2/ipc-03"]
    assert select(fleet, "state=online,site=line2") == ["line2/cam-04"]
    (tmp_path / "ids").write_text("# the pilot line\nline2/cam-04\nipc-02\n")
    assert select(fleet, f"@{tmp_path / 'ids'}") == ["line1/ipc-02", "line2/cam-04"]
    with pytest.raises(UserInputError):
        select(fleet, "colour=red")
    with pytest.raises(UserInputError):
        select(fleet, f"@{tmp_path / 'missing'}")
    assert spread(["a/1", "a/2", "a/3", "b/1", "c/1"]) == ["a/1", "b/1", "c/1", "a/2", "a/3"]


def test_abort_requested_while_running_stops_and_rolls_back(env_factory, capsys):
    import time

    env = env_factory([("g1", "fast"), ("g2", "fast"), ("g3", "fast")])
    cmd = [sys.executable, "-m", "prune_pack.cli", "rollout", str(env.v2), "--devices", "g*", "--canary", "1",
           "--soak", "30", "--gate", "p95<=40", "--config", str(env.config)]
    p = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (env.state.is_dir() and list(env.state.glob("*.jsonl"))
                   and any(e["action"] == "deploy" for e in env.log())):  # the canary is soaking now
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.1)
        rid = env.log()[0]["rollout"]
        rc, res = env.cli("rollout", "abort", rid, capsys=capsys)  # the running process does the work
        assert res["requested"] and res["state"] == "aborted"
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 9, err[-2000:]
    assert "aborted (abort requested)" in out  # the summary table
    assert env.cmds("g1") == ["deploy", "rollback"] and active_version(env.sdir("g1")) == 1
    assert env.cmds("g2") == env.cmds("g3") == []
    log = env.log()
    assert [e["action"] for e in log] == ["start", "deploy", "abort", "rollback", "finish"]  # no verdict mid-soak
    assert next(e for e in log if e["action"] == "abort")["why"] == "abort requested"
    assert "rollout: " in err  # progress on stderr
