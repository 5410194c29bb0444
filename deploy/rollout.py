"""Fleet rollout: ``prune-pack rollout PACKAGE --devices SELECTOR`` (and ``status``, ``abort``,
``resume``).

Order: the canary wave, then batches. Per wave: deploy to every device (``RemoteDevice`` over one
shared ``FleetLink``: the same command path and checks as ``prune-pack deploy``), soak once for
the whole wave, gate each device on the live stream latency p95 its telemetry reports for the new
model (a device without streams: the p95 of the profile its deploy ran) and on new stream errors,
roll back each device that misses the gate. Too many failures (any in the canary, or more than
``max_failures``) stop the rollout and roll back every device it updated, each confirmed by the
device's retained status. Every action is a line of the audit log (``deploy.rollout_log``); the
retained ``{prefix}/_rollout/{id}`` topic carries the current state for dashboards and
``prune-pack devices``.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from prune_pack.agent.manifest import target_ms
from prune_pack.agent.settings import merged
from prune_pack.deploy.fleet import (
    FleetLink,
    has_streams,
    model_key,
    online,
    select,
    spread,
    telemetry_p95,
    telemetry_stream_errors,
)
from prune_pack.deploy.remote import RemoteCommandError, RemoteDevice
from prune_pack.deploy.rollout_log import (
    FINAL,
    AuditLog,
    DeviceState,
    apply_entry,
    counts,
    device_states,
    list_logs,
    read_log,
    rollout_phase,
)
from prune_pack.deploy.settings import RolloutSection
from prune_pack.errors import DeviceUnavailable, PackageRejected, PrunePackError, UserInputError

SCHEMA_STATE = "rollout-state/1"
# Fault injection for the resume tests: "STEP[:N]" SIGKILLs this process the N-th time it reaches STEP.
DIE_ENV = "PRUNE_PACK_ROLLOUT_DIE_AT"
DIE_POINTS = ("after_start", "after_deploy", "before_gate", "after_wave", "before_rollback")
_die_counts: dict[str, int] = {}
_die_lock = threading.Lock()


class RolloutAborted(PrunePackError):
    exit_code = 9


def _die_point(step: str) -> None:
    spec = os.environ.get(DIE_ENV, "")
    name, _, n = spec.partition(":")
    if name != step:
        return
    with _die_lock:
        _die_counts[step] = _die_counts.get(step, 0) + 1
        if _die_counts[step] >= int(n or 1):
            print(f"fault injection: SIGKILL at {step} #{_die_counts[step]}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def parse_amount(value: str | int, total: int, what: str) -> int:
    """``N`` or ``P%`` of ``total`` (a share rounds up, a batch is at least 1)."""
    s = str(value).strip()
    try:
        if s.endswith("%"):
            return math.ceil(float(s[:-1]) * total / 100.0)
        n = int(s)
    except ValueError:
        raise UserInputError(f"{what} must be a count or a percentage like 10%, got {value!r}") from None
    if n < 0:
        raise UserInputError(f"{what} must not be negative, got {value!r}")
    return n


def parse_gate(text: Optional[str]) -> Optional[float]:
    """``p95<=40`` or ``40`` -> 40.0 (only the p95 of live latency is gated)."""
    if text is None:
        return None
    s = text.replace(" ", "")
    if s.startswith("p95<="):
        s = s[5:]
    elif "<=" in s:
        raise UserInputError(f"--gate supports p95<=MS, got {text!r}")
    try:
        return float(s.removesuffix("ms"))
    except ValueError:
        raise UserInputError(f"--gate must look like p95<=40, got {text!r}") from None


def plan_waves(names: list[str], canary: int, batch: int) -> list[list[str]]:
    canary = min(canary, len(names))
    waves = [names[:canary]] if canary else []
    rest = names[canary:]
    step = max(1, batch)
    waves += [rest[i:i + step] for i in range(0, len(rest), step)]
    return waves


class Progress:
    """One stderr line per event: a bar with passed / failed / pending."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, msg: str, c: Optional[dict] = None) -> None:
        if self.quiet:
            return
        bar = ""
        if c is not None:
            total = max(1, sum(c.get(k, 0) for k in ("pending", "deployed", *FINAL)))
            done = total - c.get("pending", 0) - c.get("deployed", 0)
            filled = int(30 * done / total)
            bar = (f" [{'#' * filled}{'.' * (30 - filled)}] passed {c.get('passed', 0)} failed "
                   f"{c.get('failed', 0) + c.get('rolled_back', 0) + c.get('rollback_failed', 0)} "
                   f"pending {c.get('pending', 0) + c.get('deployed', 0)} skipped {c.get('skipped', 0)}")
        print(f"rollout: {msg}{bar}", file=sys.stderr, flush=True)


class Rollout:
    """One rollout's engine (new or resumed); ``run()`` returns the result dict."""

    def __init__(self, cfg: Any, opts: RolloutSection, link: FleetLink, log: AuditLog, package: Path,
                 manifest: dict, gate_ms: float, progress: Callable[..., None], broker: Optional[str] = None) -> None:
        self.cfg, self.opts, self.link, self.log = cfg, opts, link, log
        self.package, self.manifest, self.gate_ms = package, manifest, gate_ms
        self.sha = str(manifest.get("sha256"))
        self.key = str(model_key(manifest))
        self.progress, self.broker = progress, broker
        self.package_url: Optional[str] = None  # where devices fetch the package (else it goes inline)
        self.states: dict[str, DeviceState] = {}
        self.waves: list[list[str]] = []
        self.canary_n = 0
        self.max_failures = 0
        self.state = "running"
        self.abort_why = ""
        self.started_ts_ms = int(time.time() * 1000)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- planning
    def plan(self, selector: str) -> dict:
        fleet = self.link.snapshot()
        names = select(fleet, selector)
        if not names:
            raise UserInputError(f"no device matches {selector!r} ({len(fleet)} devices known)")
        on = spread([n for n in names if online(fleet[n])])
        off = [n for n in names if not online(fleet[n])]
        o = self.opts
        self.canary_n = min(o.canary, len(on))
        self.waves = plan_waves(on, o.canary, parse_amount(o.batch, len(on), "--batch"))
        self.max_failures = parse_amount(o.max_failures, len(on), "--max-failures")
        froms = {n: model_key((fleet[n].get("status") or {}).get("model")) for n in on}
        return {"devices": froms, "offline": off, "waves": self.waves, "canary": self.canary_n,
                "max_failures": self.max_failures, "selector": selector,
                "offline_states": {n: (fleet[n].get("status") or {}).get("state", "unknown") for n in off}}

    def start(self, plan: dict) -> None:
        self.log.append("start", result="planned", why=f"{len(plan['devices'])} online, {len(plan['offline'])} offline",
                        package={"path": str(self.package.resolve()), "name": self.manifest.get("name"),
                                 "version": self.manifest.get("version"), "model_sha256": self.sha,
                                 "key": self.key, "url": self.package_url},
                        gate_p95_ms=self.gate_ms, soak_s=self.opts.soak_s, **plan)
        for n in plan["offline"]:
            self.log.append("skip", n, "offline", why=f"retained status is {plan['offline_states'][n]}")
        self.states = device_states(self.log.read(), self.key)
        _die_point("after_start")

    def load(self, entries: list[dict]) -> None:
        start = next(e for e in entries if e.get("action") == "start")
        self.waves, self.canary_n = start["waves"], start["canary"]
        self.max_failures, self.started_ts_ms = start["max_failures"], start["ts_ms"]
        self.states = device_states(entries, self.key)
        for e in entries:
            if e.get("action") == "abort":
                self.state, self.abort_why = "aborting", e.get("why", "")

    # ---------------------------------------------------------------- running
    def run(self) -> dict:
        self.publish_state()
        for i, wave in enumerate(self.waves):
            if self.state != "running":
                break
            todo = [n for n in wave if self.states[n].phase not in FINAL
                    or self.states[n].phase == "failed" and self.states[n].updated]  # a resume's unfinished rollback
            if todo:
                label = "canary" if i == 0 and self.canary_n else f"batch {i if self.canary_n else i + 1}"
                self.run_wave(label, todo)
                _die_point("after_wave")
            self.check_failures(i)
        if self.state == "aborting":
            self.rollback_all()
        return self.finish()

    def run_wave(self, label: str, todo: list[str]) -> None:
        self.progress(f"{label}: deploying to {len(todo)} device(s)", counts(self.states))
        self._parallel(self.deploy_one, [n for n in todo if self.states[n].phase == "pending"])
        soaking = [n for n in todo if self.states[n].phase == "deployed"]
        if soaking:
            _die_point("before_gate")
            self.soak_and_gate(soaking)
        bad = [n for n in todo if self.states[n].phase == "failed" and self.states[n].updated]
        self._parallel(self.rollback_one, bad)
        self.publish_state()
        self.progress(f"{label}: done", counts(self.states))

    def _parallel(self, fn: Callable[[str], None], names: list[str]) -> None:
        if not names:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(self.opts.parallel, len(names)))) as ex:
            for f in [ex.submit(fn, n) for n in names]:
                f.result()

    def _remote(self, name: str) -> RemoteDevice:
        return RemoteDevice(self.cfg.mqtt, name, broker=self.broker, max_inline_mb=self.cfg.agent.max_inline_mb,
                            shared=self.link)

    def _status_key(self, name: str) -> Optional[str]:
        return model_key((self.link.status(name) or {}).get("model"))

    def deploy_one(self, name: str) -> None:
        st = self.states[name]
        status = self.link.status(name) or {}
        if status.get("state") != "online":
            self._record("skip", name, "offline", f"retained status is {status.get('state', 'unknown')} at its turn")
            return
        if self._status_key(name) == self.key:
            # Already running the package: deployed by this rollout before a host crash (the
            # answer never made it into the log), or before the rollout. Never sent twice.
            why = ("confirmed by the retained status after a host restart" if st.from_model != self.key
                   else "already active before the rollout")
            self._record("deploy", name, "ok", why, changed=False, from_model=st.from_model)
            return
        try:
            with self._remote(name) as dev:
                res = dev.deploy_package(self.package_url or self.package, timeout=self.opts.deploy_timeout_s)
        except (PackageRejected, RemoteCommandError, DeviceUnavailable) as e:
            reason = getattr(e, "reason", type(e).__name__)
            updated = self._status_key(name) == self.key  # no answer, yet it switched
            self._record("deploy", name, "failed", f"{reason}: {e}", updated=updated, from_model=st.from_model)
            return
        _die_point("after_deploy")
        prof = (res.get("profile") or {}).get("p95_ms")
        self._record("deploy", name, "ok", "answered ok", changed=res.get("changed", True),
                     from_model=st.from_model, profile_p95_ms=prof)

    def soak_and_gate(self, names: list[str]) -> None:
        for n in names:
            self.link.watch(n)
        self.progress(f"soaking {len(names)} device(s) for {self.opts.soak_s:g} s")
        deadline = time.monotonic() + self.opts.soak_s
        while time.monotonic() < deadline and self.state == "running":
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            self.check_abort_request()
        if self.state != "running":  # aborted mid-soak: no verdicts, rollback_all takes the updated ones
            for n in names:
                self.link.unwatch(n)
            return
        for n in names:
            tels = [t for t in self.link.watched(n) if model_key(t.get("model")) == self.key]
            self.link.unwatch(n)
            ok, p95, why = self.gate(n, tels)
            self._record("gate", n, "pass" if ok else "fail", why, p95_ms=p95, samples=len(tels),
                         gate_p95_ms=self.gate_ms)

    def gate(self, name: str, tels: list[dict]) -> tuple[bool, Optional[float], str]:
        """(passed, worst p95, why) for one device after its soak."""
        status = self.link.status(name) or {}
        if status.get("state") != "online":
            return False, None, f"went {status.get('state')} during the soak"
        if self._status_key(name) != self.key:
            return False, None, "the retained status no longer names the package's model"
        last = tels[-1] if tels else self.link.telemetry(name)
        if has_streams(last):
            if not tels:
                return False, None, "no telemetry for the new model during the soak (soak shorter than the telemetry interval?)"
            vals = [v for v in (telemetry_p95(t) for t in tels) if v is not None]
            if not vals:
                return False, None, "streams report no latency during the soak"
            errs = telemetry_stream_errors(tels[-1]) - telemetry_stream_errors(tels[0])
            worst = max(vals)
            if errs > 0:
                return False, worst, f"{errs} new stream error(s) during the soak"
            if worst > self.gate_ms:
                return False, worst, f"live p95 {worst:.1f} ms > gate {self.gate_ms:g} ms"
            return True, worst, f"live p95 {worst:.1f} ms <= {self.gate_ms:g} ms over {len(vals)} report(s)"
        prof = self.states[name].profile_p95_ms
        if prof is None:
            return False, None, "no streams and no profile p95 in the deploy answer"
        if prof > self.gate_ms:
            return False, prof, f"profile p95 {prof:.1f} ms > gate {self.gate_ms:g} ms (no streams)"
        return True, prof, f"profile p95 {prof:.1f} ms <= {self.gate_ms:g} ms (no streams)"

    def rollback_one(self, name: str) -> None:
        st = self.states[name]
        _die_point("before_rollback")
        target = st.from_model
        if self._status_key(name) != self.key:
            # It already runs something else (rolled back before a host crash, or by an operator).
            self._record("rollback", name, "ok" if self._status_key(name) == target else "failed",
                         f"the retained status already shows {self._status_key(name)}")
            return
        try:
            with self._remote(name) as dev:
                dev.call("rollback", timeout=self.opts.rollback_timeout_s, retries=0)
        except PrunePackError as e:
            self._record("rollback", name, "failed", str(e))
            return
        confirmed = self.link.wait_until(lambda: model_key(((self.link.devices.get(name) or {}).get("status") or {})
                                                             .get("model")) == target,
                                         self.opts.rollback_timeout_s)
        self._record("rollback", name, "ok" if confirmed else "failed",
                     "confirmed by the retained status" if confirmed else
                     f"the retained status does not show {target} after {self.opts.rollback_timeout_s:g} s")

    def rollback_all(self) -> None:
        names = sorted(n for n, s in self.states.items() if s.updated)
        self.progress(f"aborted ({self.abort_why}): rolling back {len(names)} updated device(s)", counts(self.states))
        self._parallel(self.rollback_one, names)

    def check_failures(self, wave_index: int) -> None:
        if self.state != "running":
            return
        failures = sum(1 for s in self.states.values() if s.failed)
        if wave_index == 0 and self.canary_n and failures:
            self.abort("the canary failed")
        elif failures > self.max_failures:
            self.abort(f"{failures} failures > max {self.max_failures}")
        else:
            self.check_abort_request()

    def check_abort_request(self) -> None:
        if self.state == "running" and self.log.rid in self.link.abort_requests:
            self.abort("abort requested")

    def abort(self, why: str) -> None:
        with self._lock:
            if self.state != "running":
                return
            self.state, self.abort_why = "aborting", why
        self.log.append("abort", result="aborting", why=why)
        self.publish_state()

    def finish(self) -> dict:
        final = "aborted" if self.state == "aborting" else "done"
        c = counts(self.states)
        self.log.append("finish", result=final, why=self.abort_why, state=final, counts=c)
        self.state = final
        self.publish_state()
        if self.log.rid in self.link.abort_requests:
            self.link.publish(self.link.rollout_topic(self.log.rid) + "/abort", None, retain=True)
        return self.result()

    def _record(self, action: str, name: str, result: str, why: str, **fields: Any) -> None:
        e = self.log.append(action, name, result, why, **fields)
        with self._lock:
            apply_entry(self.states[name], e, self.key)

    # ---------------------------------------------------------------- reporting
    def publish_state(self) -> None:
        c = counts(self.states)
        body = {"schema": SCHEMA_STATE, "id": self.log.rid, "state": self.state, "by": self.log.by,
                "package": {"name": self.manifest.get("name"), "version": self.manifest.get("version"),
                            "sha256": self.sha}, "gate_p95_ms": self.gate_ms, "started_ts_ms": self.started_ts_ms,
                "ts_ms": int(time.time() * 1000), "counts": c, "why": self.abort_why,
                "devices": {n: s.phase for n, s in sorted(self.states.items())}}
        self.link.publish(self.link.rollout_topic(self.log.rid), body, retain=True)

    def result(self) -> dict:
        c = counts(self.states)
        rows = [f"{'DEVICE':<28} {'RESULT':<16} {'P95 MS':>7}  WHY"]
        for n, s in sorted(self.states.items()):
            p = f"{s.p95_ms:.1f}" if isinstance(s.p95_ms, (int, float)) else "-"
            rows.append(f"{n:<28} {s.phase:<16} {p:>7}  {s.why[:70]}")
        head = (f"rollout {self.log.rid}: {self.state}" + (f" ({self.abort_why})" if self.abort_why else "")
                + f"; {self.manifest.get('name')} v{self.manifest.get('version')} ({self.sha[:12]}), gate p95<="
                f"{self.gate_ms:g} ms; passed {c['passed']}, failed {c['failures']}, rolled back {c['rolled_back']}, "
                f"skipped {c['skipped']}; log {self.log.path}")
        out = {"id": self.log.rid, "state": self.state, "why": self.abort_why, "counts": c, "log": str(self.log.path),
               "gate_p95_ms": self.gate_ms, "package_sha256": self.log.package_sha256, "model_sha256": self.sha,
               "devices": {n: {"result": s.phase, "p95_ms": s.p95_ms, "why": s.why} for n, s in sorted(self.states.items())},
               "summary": "\n".join([head, *rows])}
        if self.state == "aborted":
            out["exit_code"] = RolloutAborted.exit_code
        return out



# ---------------------------------------------------------------- CLI


def _options(args: Any, cfg: Any) -> RolloutSection:
    return merged(cfg.rollout, canary=getattr(args, "canary", None), batch=getattr(args, "batch", None),
                  max_failures=getattr(args, "max_failures", None), gate_p95_ms=parse_gate(getattr(args, "gate", None)),
                  soak_s=getattr(args, "soak", None), parallel=getattr(args, "parallel", None))


def _manifest(package: Path) -> tuple[dict, str]:
    from prune_pack.agent.package import read_manifest, sha256_file

    if not package.is_file():
        raise UserInputError(f"package not found: {package}")
    return read_manifest(package), sha256_file(package)


def _gate(opts: RolloutSection, manifest: dict) -> float:
    gate = opts.gate_p95_ms if opts.gate_p95_ms is not None else target_ms(manifest)
    if gate is None:
        raise UserInputError("the package names no latency target: give --gate p95<=MS (or rollout.gate_p95_ms)")
    return gate


def cli_rollout(args: Any, cfg: Any) -> dict:
    what = args.what
    if what == "status":
        return rollout_status(args, cfg)
    if what in ("abort", "resume"):
        if not args.rid:
            raise UserInputError(f"rollout {what} needs a rollout ID (see prune-pack rollout status)")
        return rollout_abort(args, cfg) if what == "abort" else rollout_resume(args, cfg)
    if args.rid:
        raise UserInputError(f"unexpected argument {args.rid!r}")
    if not args.devices:
        raise UserInputError("rollout PACKAGE needs --devices SELECTOR")
    return rollout_new(args, cfg)


def rollout_new(args: Any, cfg: Any) -> dict:
    opts = _options(args, cfg)
    package = Path(args.what)
    manifest, pkg_sha = _manifest(package)
    gate = _gate(opts, manifest)
    rid = time.strftime("r%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:4]
    progress = Progress()
    with FleetLink(cfg.mqtt, broker=args.broker).connect(wait_s=args.wait) as link:
        log = AuditLog(opts.state_dir, rid, pkg_sha)
        engine = Rollout(cfg, opts, link, log, package, manifest, gate, progress, broker=args.broker)
        engine.package_url = getattr(args, "package_url", None)
        plan = engine.plan(args.devices)
        if args.dry_run:
            waves = plan["waves"]
            lines = [f"dry run: {len(plan['devices'])} device(s) in {len(waves)} wave(s), {len(plan['offline'])} offline "
                     f"(skipped), gate p95<={gate:g} ms, soak {opts.soak_s:g} s, max failures {plan['max_failures']}"]
            lines += [f"  {'canary' if i == 0 and plan['canary'] else 'batch'} {i}: {', '.join(w)}" for i, w in enumerate(waves)]
            lines += [f"  offline: {n} ({plan['offline_states'][n]})" for n in plan["offline"]]
            return {"dry_run": True, "waves": waves, "offline": plan["offline"], "canary": plan["canary"],
                    "max_failures": plan["max_failures"], "gate_p95_ms": gate, "summary": "\n".join(lines)}
        if not log.lock():
            raise UserInputError(f"rollout {rid} is locked by another process")
        try:
            engine.start(plan)
            progress(f"{rid}: {len(plan['devices'])} device(s), {len(plan['waves'])} wave(s), "
                     f"{len(plan['offline'])} offline; log {log.path}", counts(engine.states))
            return engine.run()
        finally:
            log.unlock()


def _engine_from_log(cfg: Any, opts: RolloutSection, link: FleetLink, log: AuditLog, entries: list[dict],
                     broker: Optional[str]) -> Rollout:
    start = next((e for e in entries if e.get("action") == "start"), None)
    if start is None:
        raise UserInputError(f"{log.path} has no start line")
    package = Path(start["package"]["path"])
    manifest, pkg_sha = _manifest(package)
    if pkg_sha != start.get("package_sha256"):
        raise UserInputError(f"{package} changed since the rollout started (sha256 {pkg_sha[:12]} != "
                             f"{str(start.get('package_sha256'))[:12]})")
    log.package_sha256 = pkg_sha
    opts = merged(opts, soak_s=start.get("soak_s"))
    engine = Rollout(cfg, opts, link, log, package, manifest, float(start["gate_p95_ms"]), Progress(), broker=broker)
    engine.load(entries)
    engine.package_url = start["package"].get("url")
    return engine


def rollout_resume(args: Any, cfg: Any) -> dict:
    opts = _options(args, cfg)
    log = AuditLog(opts.state_dir, args.rid)
    entries = read_log(log.path)
    if rollout_phase(entries) != "running":
        raise UserInputError(f"rollout {args.rid} is already {rollout_phase(entries)}; nothing to resume")
    if not log.lock():
        raise UserInputError(f"rollout {args.rid} is running in another process")
    try:
        with FleetLink(cfg.mqtt, broker=args.broker).connect(wait_s=args.wait) as link:
            engine = _engine_from_log(cfg, opts, link, log, entries, args.broker)
            log.append("resume", result="resuming", why="operator resumed after an interruption")
            engine.progress(f"{args.rid}: resuming", counts(engine.states))
            return engine.run()
    finally:
        log.unlock()


def rollout_abort(args: Any, cfg: Any) -> dict:
    """Ask a running rollout to stop (retained request); with no process running it (its lock is
    free), roll back what it updated right here."""
    opts = _options(args, cfg)
    log = AuditLog(opts.state_dir, args.rid)
    with FleetLink(cfg.mqtt, broker=args.broker).connect(wait_s=args.wait) as link:
        link.publish(link.rollout_topic(args.rid) + "/abort", {"by": log.by, "ts_ms": int(time.time() * 1000)},
                     retain=True)
        if not log.path.is_file() or not log.lock():
            done = link.wait_until(lambda: link.rollouts.get(args.rid, {}).get("state") in ("aborted", "done"),
                                   opts.deploy_timeout_s + opts.soak_s + opts.rollback_timeout_s)
            st = link.rollouts.get(args.rid, {})
            return {"id": args.rid, "requested": True, "state": st.get("state"), "counts": st.get("counts"),
                    "summary": f"rollout {args.rid}: abort requested; state {st.get('state', 'unknown')}"
                               + ("" if done else " (not finished yet)")}
        try:
            entries = read_log(log.path)
            if rollout_phase(entries) != "running":
                link.publish(link.rollout_topic(args.rid) + "/abort", None, retain=True)
                raise UserInputError(f"rollout {args.rid} is already {rollout_phase(entries)}")
            engine = _engine_from_log(cfg, opts, link, log, entries, args.broker)
            if engine.state == "running":
                engine.abort("abort requested")
            engine.rollback_all()
            return engine.finish()
        finally:
            log.unlock()


def rollout_status(args: Any, cfg: Any) -> dict:
    opts = _options(args, cfg)
    if args.rid:
        log = AuditLog(opts.state_dir, args.rid)
        if log.path.is_file():
            entries = read_log(log.path)
            start = next((e for e in entries if e.get("action") == "start"), {})
            states = device_states(entries, (start.get("package") or {}).get("key", ""))
            phase = rollout_phase(entries)
            c = counts(states)
            lines = [f"rollout {args.rid}: {phase}; passed {c['passed']}, failed {c['failures']}, "
                     f"rolled back {c['rolled_back']}, skipped {c['skipped']}, pending {c['pending'] + c['deployed']}"]
            lines += [f"  {n:<28} {s.phase:<16} {s.why[:70]}" for n, s in sorted(states.items())]
            return {"id": args.rid, "state": phase, "counts": c, "log": str(log.path), "lines": len(entries),
                    "devices": {n: s.phase for n, s in states.items()}, "summary": "\n".join(lines)}
    with FleetLink(cfg.mqtt, broker=args.broker, telemetry=False, results=False).connect(wait_s=args.wait) as link:
        rollouts = dict(link.rollouts)
    if args.rid:
        if args.rid not in rollouts:
            raise UserInputError(f"no rollout {args.rid} (no log in {opts.state_dir}, no retained state)")
        r = rollouts[args.rid]
        return {**r, "summary": f"rollout {args.rid}: {r.get('state')} {r.get('counts')}"}
    local = {p.stem: rollout_phase(read_log(p)) for p in list_logs(opts.state_dir)}
    ids = sorted(set(local) | set(rollouts))
    lines = [f"{rid:<28} {rollouts.get(rid, {}).get('state') or local.get(rid):<10} "
             f"{(rollouts.get(rid, {}).get('package') or {}).get('name', '')}" for rid in ids]
    return {"rollouts": {rid: rollouts.get(rid, {}).get("state") or local.get(rid) for rid in ids},
            "summary": "\n".join(lines) or "no rollouts"}
