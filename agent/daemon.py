"""The device daemon: ``prune-pack agent run --config FILE``.

Threads: paho's network thread (only enqueues commands), two command workers (a fast lane
for ping/status/list-models and every error answer, a slow lane for profile/deploy/activate/
rollback, so a long deploy never delays a ping), the outbox sender (agent.mqtt), the stream
workers (agent.streams), and the main thread: the working loop that sends telemetry, checks
the other threads and only then tells systemd ``WATCHDOG=1``.

Deploy = fetch -> verify (signature, hashes) -> validated backend/precision -> version check
-> stage into the store -> load and profile -> atomic switch -> hot swap of the streams. A
failure at any step answers with a reason and leaves the active model running.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

from prune_pack import __version__
from prune_pack.agent.cmdauth import CommandAuth, NonceStore
from prune_pack.agent.commands import (
    COMMON_FIELDS,
    FAST,
    PROFILE_ARGS,
    SLOW,
    SOURCE_ARGS,
    SOURCES,
    Arg,
    CommandError,
    command,
    given_source,
    lane_of,
    load_all,
    lookup,
    parse_request,
    request_id_of,
)
from prune_pack.agent.fetch import Fetched
from prune_pack.agent.fsutil import disk_full, free_bytes
from prune_pack.agent.manifest import class_names, target_ms
from prune_pack.agent.mqtt import SCHEMA_DETECTIONS, SCHEMA_RESULT, SCHEMA_TELEMETRY, MqttLink
from prune_pack.agent.settings import (
    AgentSection,
    DeviceSection,
    HarvestSection,
    HomeAssistantSection,
    InferenceSection,
    MqttSection,
    ProfileSection,
    StreamSection,
    merged,
)
from prune_pack.agent.store import ModelStore, StoredModel, StoreError
from prune_pack.agent.system import crash_point, machine_id, sd_notify, temperature_c, watchdog_interval_s
from prune_pack.errors import PrunePackError, ReasonedError

log = logging.getLogger("prune_pack.agent.daemon")

MiB = 1024 * 1024


# ---------------------------------------------------------------------- daemon


class Daemon:
    def __init__(self, device: DeviceSection, mqtt: MqttSection, agent: AgentSection, profile: ProfileSection,
                 inference: InferenceSection, streams: Optional[list[StreamSection]] = None,
                 harvest: Optional[HarvestSection] = None,
                 homeassistant: Optional[HomeAssistantSection] = None) -> None:
        self.device, self.mqtt, self.agent = device, mqtt, agent
        self.homeassistant = homeassistant
        self.discovery: Any = None  # agent.discovery.Discovery when homeassistant.discovery is on
        self.last_telemetry: Optional[dict] = None
        self._metrics_httpd: Any = None  # agent.metrics_listen: this agent's own /metrics
        self.profile_cfg, self.inference, self.stream_cfgs = profile, inference, list(streams or [])
        self.state_dir = Path(agent.state_dir)
        self.store = ModelStore(self.state_dir)
        self.cache_dir = self.state_dir / "cache"
        self.link: Optional[MqttLink] = None
        self.session: Any = None  # the active model, loaded
        self.precision: Optional[str] = None
        self.streams: Any = None
        self._model_lock = threading.RLock()
        self._fast: queue.Queue = queue.Queue(maxsize=256)
        self._slow: queue.Queue = queue.Queue(maxsize=16)
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self.started = time.time()
        self.ready = threading.Event()
        self.unanswered = 0  # commands dropped because the fast queue was full
        self.busy = 0  # commands answered "busy" because the slow queue was full
        self._proc: Any = None
        self.harvest_cfg = harvest or HarvestSection()
        self.harvester: Any = None  # agent.harvest.Harvester, from start() (agent.frames.start_harvester)
        self.auth: Optional[CommandAuth] = None

    @classmethod
    def from_config(cls, cfg: Any) -> "Daemon":
        return cls(cfg.device, cfg.mqtt, cfg.agent, cfg.profile, cfg.inference, cfg.streams, cfg.harvest,
                   homeassistant=cfg.homeassistant)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        load_all()
        if self.agent.allow_unsigned:
            log.warning("agent.allow_unsigned is a host setting (prune-pack profile/verify); the daemon refuses unsigned packages")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store.open(trust=self._signed_by_trusted_key)
        for note in self.store.recovered:
            log.warning("store recovery: %s", note)
        # Credentials and broker URL are checked before the (possibly slow) model load.
        self.auth = CommandAuth(self.agent.command_keys, self.agent.revoked_keys, self.device.id, self.device.site,
                                NonceStore(self.state_dir / "nonces.json"), self.agent.allow_unsigned_commands)
        if self.agent.allow_unsigned_commands:
            log.warning("agent.allow_unsigned_commands: anyone who can publish to cmd/ can deploy and run code")
        self.link = MqttLink(self.device, self.mqtt, self.state_dir, self._enqueue, self._status_fields)
        ha = self.homeassistant
        if ha is not None and ha.discovery and self.link.enabled:
            from prune_pack.agent.discovery import Discovery

            self.discovery = Discovery(self.link, ha.prefix, [s.name for s in self.stream_cfgs],
                                       lambda: self._model_info(self.store.active))
        self._load_initial()
        for name, q in (("cmd-fast", self._fast), ("cmd-slow", self._slow)):
            t = threading.Thread(target=self._worker, args=(q,), name=name, daemon=True)
            t.start()
            self._workers.append(t)
        if self.agent.metrics_listen:
            from prune_pack.agent.prom import AgentCollector, serve

            self._metrics_httpd = serve(self.agent.metrics_listen, AgentCollector(self))
        self.link.start()
        from prune_pack.agent.frames import start_harvester

        self.harvester = start_harvester(self)
        if self.stream_cfgs and self.session is not None:
            self._start_streams()
        self.ready.set()
        sd_notify(f"READY=1\nSTATUS=serving {self._model_label()}")
        log.info("agent ready: %s, device %s/%s", self._model_label(), self.device.site, self.device.id)

    def _load_initial(self) -> None:
        """Load the active model; a model that verifies but cannot be loaded is rolled back."""
        for _ in range(2):
            m = self.store.active
            if m is None:
                return
            try:
                self.session, self.precision = self._load(m)
                return
            except PrunePackError as e:
                log.error("active model %s does not load (%s)", m.id, e)
                try:
                    self.store.rollback()
                except StoreError:
                    return

    def _signed_by_trusted_key(self, model_dir: Path) -> bool:
        from prune_pack.agent.verifier import signature_verifies

        ok = signature_verifies(model_dir, self.agent.trusted_keys, self.agent.revoked_keys)
        if not ok:
            log.error("stored model %s: its signature does not verify against agent.trusted_keys", model_dir.name)
        return ok

    def request_stop(self) -> None:
        self._stop.set()

    def run(self, install_signals: bool = True) -> None:
        """The working loop (main thread): telemetry, health checks, WATCHDOG=1."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        wd = watchdog_interval_s() if self.agent.watchdog else None
        tick = min(1.0, self.agent.telemetry_interval_s, wd or 1.0)
        next_telemetry = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_telemetry:
                    self._send_telemetry()
                    next_telemetry = now + self.agent.telemetry_interval_s
                if wd is not None and self.healthy():
                    sd_notify("WATCHDOG=1")
                self._stop.wait(max(0.01, min(tick, next_telemetry - time.monotonic())))
        finally:
            self.shutdown()

    def healthy(self) -> bool:
        """For WATCHDOG=1 (sent by the working loop, so a hung loop is caught too): the command
        workers, the outbox sender and paho's network thread are alive."""
        dead = [t.name for t in self._workers if not t.is_alive()]
        if self.link is not None and not self.link.alive():
            dead.append("mqtt")
        if dead:
            log.error("thread(s) %s died; withholding WATCHDOG=1 so systemd restarts the agent", ", ".join(dead))
        return not dead

    def health(self) -> dict:
        """Telemetry's ``health``: free space of state_dir, and why the agent is degraded (if it is)."""
        free = free_bytes(self.state_dir)
        reasons = []
        if free is not None and free < self.agent.min_free_mb * MiB:
            reasons.append(f"state_dir has {free / MiB:.1f} MiB free (< agent.min_free_mb)")
        link = self.link
        if link is not None and link.outbox.degraded:
            reasons.append(link.outbox.degraded[:200])
        return {"state_free_mb": round(free / MiB, 1) if free is not None else None, "degraded": bool(reasons),
                "reasons": reasons, "outbox_recreated": link.outbox.recreated if link else 0,
                "messages_lost": link.send_failed if link else 0, "commands_busy": self.busy,
                "commands_unanswered": self.unanswered}

    def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        self._stop.set()
        for q in (self._fast, self._slow):
            try:
                q.put_nowait(None)
            except queue.Full:
                pass
        if self.streams is not None:
            try:
                self.streams.stop()
            except Exception as e:  # noqa: BLE001
                log.warning("stopping streams: %s", e)
        if self.harvester is not None:
            self.harvester.stop()
        for t in self._workers:
            t.join(2)
        if self.link is not None:
            self.link.stop()
            self.link = None
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None

    # ------------------------------------------------------------ model handling
    def _load(self, m: StoredModel, precision: Optional[str] = None) -> tuple[Any, str]:
        from prune_pack.agent.backends import load_session

        prec = precision or self.inference.precision or m.precision
        session = load_session(m.model_path, backend=self.inference.backend, precision=prec,
                               threads=self.inference.threads, cache_dir=self.cache_dir)
        return session, prec

    def _start_streams(self) -> None:
        from prune_pack.agent.streams import StreamManager

        m = self.store.active
        assert m is not None
        from prune_pack.agent.streams import session_factory_for

        factory = session_factory_for(self.inference, len(self.stream_cfgs), self.cache_dir)
        self.streams = StreamManager(streams=self.stream_cfgs, inference=self.inference, session_factory=factory,
                                     names=class_names(m.manifest), on_detections=self._on_detections,
                                     model_path=m.model_path, harvester=self.harvester)
        self.streams.start()  # loads the model before the first frame is read

    def _on_detections(self, stream: str, body: dict) -> None:
        link = self.link
        if link is None or not link.connected:
            if link is not None:
                link.detections_dropped += 1
            return
        fields = {k: v for k, v in body.items() if k not in ("schema", "device_id", "site", "session", "seq", "ts_ms", "stream", "historical")}
        fields.setdefault("detections", [])
        link.publish_live(link.topics.detections(stream), link.envelope(SCHEMA_DETECTIONS, stream=stream, **fields))

    def _switch(self, m: StoredModel, session: Any, precision: str) -> None:
        with self._model_lock:
            self.session, self.precision = session, precision
        if self.stream_cfgs:
            if self.streams is None:
                self._start_streams()
            else:
                self.streams.swap(m.model_path, class_names(m.manifest))
        if self.link is not None:
            self.link.republish_status()
        if self.discovery is not None:  # the device's model shown in Home Assistant
            self.discovery.publish()
        sd_notify(f"STATUS=serving {self._model_label()}")

    def _model_label(self) -> str:
        m = self.store.active
        return f"{m.name} v{m.version} ({m.sha256[:12]})" if m else "no model"

    def _model_info(self, m: Optional[StoredModel]) -> Optional[dict]:
        if m is None:
            return None
        info = {**m.summary(), "backend": self.inference.backend, "precision": self.precision or m.precision}
        target = target_ms(m.manifest)
        if target is not None:  # what dashboards and alerts compare the latency with
            info["target_ms"] = target
        return info

    # ------------------------------------------------------------ status / telemetry
    def _status_fields(self) -> dict:
        prev = self.store.previous
        return {"agent_version": __version__, "started_ts_ms": int(self.started * 1000),
                "model": self._model_info(self.store.active), "previous": prev.summary() if prev else None,
                "streams": [s.name for s in self.stream_cfgs]}

    def telemetry(self) -> dict:
        import psutil

        if self._proc is None:  # one Process object: cpu_percent() measures since its previous call
            self._proc = psutil.Process()
            self._proc.cpu_percent(None)
        proc = self._proc
        with proc.oneshot():
            cpu = proc.cpu_percent(None)
            rss = proc.memory_info().rss
        body: dict[str, Any] = {
            "cpu_percent": round(cpu, 1), "system_cpu_percent": round(psutil.cpu_percent(None), 1),
            "rss_mb": round(rss / MiB, 1), "load": [round(x, 2) for x in os.getloadavg()],
            "temperature_c": temperature_c(), "uptime_s": round(time.time() - self.started, 1),
            "model": self._model_info(self.store.active), "streams": [],
            "queue": self.link.queue_info() if self.link else {"pending": 0, "dropped": 0},
            "detections_dropped": self.link.detections_dropped if self.link else 0,
        }
        body["inference"] = None
        body["harvest"] = self.harvester.status() if self.harvester is not None else None
        body["health"] = self.health()
        if self.streams is not None:
            try:
                m = self.streams.metrics()
                # A list with a ``stream`` field: JSON-to-metrics tools turn fields into labels, not keys.
                body["streams"] = [{"stream": name, **v} for name, v in m.get("streams", {}).items()]
                body["inference"] = {k: m.get(k) for k in ("workers", "threads", "backend", "swaps", "uptime_s",
                                                           "started_ts_ms")}
            except Exception as e:  # noqa: BLE001 - telemetry must go out regardless
                log.warning("stream metrics: %s", e)
        return body

    def _send_telemetry(self) -> None:
        link = self.link
        if (link is None or not link.enabled) and self._metrics_httpd is None:
            return
        try:
            body = self.telemetry()
            if link is not None and link.enabled:
                msg = link.envelope(SCHEMA_TELEMETRY, **body)
                link.send(link.topics.telemetry, msg, qos=0, retain=True)
            else:
                msg = {**body, "ts_ms": int(time.time() * 1000)}
            self.last_telemetry = msg  # what the agent's own /metrics shows (agent.prom)
        except Exception as e:  # noqa: BLE001 - never let telemetry stop the working loop
            log.warning("telemetry failed: %s", e)

    # ------------------------------------------------------------ commands
    def _enqueue(self, name: str, payload: bytes, retained: bool = False) -> None:
        """paho's network thread: classify and hand over, never block."""
        max_bytes = int(self.agent.max_payload_kb * 1024)
        if len(payload) > max_bytes:
            item = (name, None, CommandError("payload_too_large", f"{len(payload)} bytes > {max_bytes}"))
        elif retained:
            # A retained command would run again on every reconnect (think: rollback).
            item = (name, payload, CommandError("retained", "commands must not be published with the retain flag; "
                                                            "clear it with an empty retained message"))
        else:
            item = (name, payload, None)
        target = self._slow if lane_of(name) == SLOW and item[2] is None else self._fast
        try:
            target.put_nowait(item)
        except queue.Full:
            self.busy += 1
            try:
                self._fast.put_nowait((name, payload if len(payload) <= max_bytes else None,
                                       CommandError("busy", f"{self._slow.maxsize} commands are waiting; retry later")))
            except queue.Full:
                self.unanswered += 1
                log.error("command queue full; dropping a %s command unanswered", name)

    def _worker(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None or self._stop.is_set() and q is self._slow:
                return
            name, payload, error = item
            try:
                self._answer(name, payload, error)
            except Exception as e:  # noqa: BLE001 - a worker must survive anything
                log.exception("answering %s failed: %s", name, e)

    def _answer(self, name: str, payload: Optional[bytes], error: Optional[CommandError]) -> None:
        request_id: Optional[str] = None
        result: Any = None
        if payload is not None:
            request_id = request_id_of(payload)
        if error is None:
            try:
                request = parse_request(payload or b"")
                request_id = request["request_id"]
                spec = lookup(name)
                args = {k: v for k, v in request.items() if k not in COMMON_FIELDS}
                spec.check(args)
                if spec.needs_signature(args):
                    self._authorize(name, request, args)
                result = spec.handler(self, args)
            except ReasonedError as e:  # CommandError, PackageRejected, StoreError: their own reason
                error = e if isinstance(e, CommandError) else CommandError(e.reason, e.detail)
            except PrunePackError as e:
                error = CommandError("failed", str(e))
            except Exception as e:  # noqa: BLE001 - answered, logged, the daemon lives on
                if disk_full(e):
                    error = CommandError("disk_full", f"{type(e).__name__}: {e}")
                    log.error("command %s: disk full (%s)", name, e)
                else:
                    log.exception("command %s crashed", name)
                    error = CommandError("internal", f"{type(e).__name__}: {e}")
        body: dict[str, Any] = {"request_id": request_id, "cmd": name, "ok": error is None}
        if error is None:
            body["result"] = result
        else:
            body["error"] = {"reason": error.reason, "detail": error.detail[:1000]}
            log.info("command %s (%s) failed: %s", name, request_id, error)
        link = self.link
        if link is not None:
            link.send(link.topics.result(name), link.envelope(SCHEMA_RESULT, **body), qos=1)

    def _authorize(self, name: str, request: dict, args: dict) -> None:
        """Signed commands (agent.cmdauth): refused unless signed by a command key for this device;
        ``force`` (a downgrade, an unvalidated backend) always needs a signature."""
        kid = self.auth.check(name, request) if self.auth is not None else None
        if kid is None and args.get("force"):
            raise CommandError("unsigned_command", "force needs a signed request")
        if kid is not None:
            log.info("command %s signed by %s", name, kid)

    @command("ping", FAST)
    def cmd_ping(self, args: dict) -> dict:
        return {"pong": True, "uptime_s": round(time.time() - self.started, 1)}

    @command("status", FAST)
    def cmd_status(self, args: dict) -> dict:
        return {**self._status_fields(), "state": "online" if self.link and self.link.connected else "offline",
                "queue": self.link.queue_info() if self.link else None, "session": self.link.session if self.link else None,
                "backend": self.inference.backend,
                "streams_metrics": self.streams.metrics().get("streams", {}) if self.streams else {}}

    @command("list-models", FAST)
    def cmd_list_models(self, args: dict) -> dict:
        return {"models": [{**m.summary(), "state": self.store.state_of(m.id)} for m in self.store.list()]}

    @command("rollback", SLOW, signed=True)
    def cmd_rollback(self, args: dict) -> dict:
        with self._model_lock:
            prev = self.store.previous
            if prev is None:
                raise CommandError("no_previous", "there is no previous model to roll back to")
            self._check_stored_signature(prev)
            session, precision = self._load(prev)
            m = self.store.rollback()
            self._switch(m, session, precision)
            return {"active": self._model_info(m), "previous": self.store.previous.summary() if self.store.previous else None}

    @command("activate", SLOW, signed=True,
             args={"model": Arg("string", required=True, min_length=8, max_length=128), "force": Arg("boolean")})
    def cmd_activate(self, args: dict) -> dict:
        from prune_pack.agent.manifest import check_validated

        with self._model_lock:
            m = self.store.find(args["model"])
            self._check_stored_signature(m)
            self._check_policy(m.manifest, args.get("force", False))
            precision = check_validated(m.manifest, self.inference.backend, self.inference.precision, args.get("force", False))
            session, precision = self._load(m, precision)
            self.store.activate(m.id)
            self._switch(m, session, precision)
            return {"active": self._model_info(m), "previous": self.store.previous.summary() if self.store.previous else None}

    @command("deploy", SLOW, signed=True, args={**SOURCE_ARGS, "force": Arg("boolean")}, one_of=SOURCES,
             one_required=True)
    def cmd_deploy(self, args: dict) -> dict:
        from prune_pack.agent.manifest import check_validated

        force = args.get("force", False)
        with self._model_lock, self._fetched(args) as pkg:
            vp = self._verify(pkg)
            try:
                crash_point("verified")
                precision = check_validated(vp.manifest, self.inference.backend, self.inference.precision, force)
                self._check_policy(vp.manifest, force)
                m = self.store.stage(vp.dir, crash_hook=crash_point)
            except BaseException:
                vp.discard()
                raise
            crash_point("staged")
            was_kept = m.id in (self.store._active, self.store._previous)  # noqa: SLF001
            try:
                session, precision = self._load(m, precision)
                prof = self._profile(m.model_path, self.inference.backend, precision, {})
                prof.pop("latencies_ms", None)
            except Exception as e:
                if not was_kept:
                    self.store.remove(m.id)
                if isinstance(e, PrunePackError):
                    raise CommandError("load_failed", str(e)) from None
                raise
            if m.id == self.store._active:  # noqa: SLF001
                return {"active": self._model_info(m), "changed": False, "profile": prof}
            self.store.activate(m.id, crash_hook=crash_point)
            self._switch(m, session, precision)
            prev = self.store.previous
            return {"active": self._model_info(m), "changed": True, "previous": prev.summary() if prev else None,
                    "signed": vp.signed, "key_id": vp.key_id, "profile": prof}

    @command("profile", SLOW, signed=given_source, args={**SOURCE_ARGS, "force": Arg("boolean"), **PROFILE_ARGS},
             one_of=SOURCES)
    def cmd_profile(self, args: dict) -> dict:
        """Profile the active model or a given package, isolated: the package is verified into a
        private folder, measured and removed; nothing is stored or activated. Every requested
        backend/precision is measured (``backend: all``, ``precision: "fp32,int8"``); each
        result says whether the host ``validated`` that combination."""
        if any(k in args for k in ("package_b64", "path", "url")):
            with self._fetched(args) as pkg:
                result = self._profile(pkg, args.get("backend"), args.get("precision"), args, package=True)
            model = {k: result.get("model", {}).get(k) for k in ("name", "version", "signed", "key_id")}
            model["sha256"] = result.get("model_sha256")
        else:
            m = self.store.active
            if m is None:
                raise CommandError("no_active_model", "no model is active; give a package to profile")
            result = self._profile(m.model_path, args.get("backend"), args.get("precision") or self.precision, args)
            model = m.summary()
        result.pop("model", None)
        return {"model": model, "activated": False, **result}

    def _profile(self, model: Path, backend: Optional[str], precision: Optional[str], args: dict,
                 package: bool = False) -> dict:
        from prune_pack.agent.profiler import profile_model

        given = {k: args.get(k) for k in ("threads", "warmup", "runs", "seconds")}
        opts = merged(self.profile_cfg, backend=backend, precision=precision, **given)
        if given["runs"] is not None and given["seconds"] is None:
            opts = dataclasses.replace(opts, seconds=None)  # an explicit run count wins over the config's seconds
        kw: dict[str, Any] = dict(threads=opts.threads, warmup=opts.warmup, runs=opts.runs, seconds=opts.seconds,
                                  backend=opts.backend, precision=opts.precision, cache_dir=self.cache_dir)
        if package:
            # The daemon never runs an unsigned package, whatever agent.allow_unsigned says (a host setting).
            kw.update(trusted_keys=self.agent.trusted_keys, revoked_keys=self.agent.revoked_keys,
                      allow_unsigned=False, max_bytes=int(self.agent.max_package_mb * MiB), require_package=True)
        try:
            return profile_model(model, **kw)
        except ReasonedError:  # PackageRejected keeps its reason
            raise
        except PrunePackError as e:
            raise CommandError("profile_failed", str(e)) from None

    def _check_stored_signature(self, m: StoredModel) -> None:
        """A stored model runs again only while its signer is trusted and not revoked (keys change)."""
        if not self._signed_by_trusted_key(m.dir):
            raise CommandError("untrusted_key", f"stored model {m.id}: its signature no longer verifies "
                                                "against agent.trusted_keys / revoked_keys")

    def _check_policy(self, manifest: dict, force: bool) -> None:
        """Expiry, device binding, and the version memory (replay/downgrade/jump guard)."""
        from prune_pack.agent.manifest import check_binding, check_newer

        check_binding(manifest, self.device.id, self.device.site, machine_id(), time.time())
        check_newer(manifest, self.store.highest(str(manifest.get("name"))), force, self.agent.max_version_jump)

    def _verify(self, pkg: Path, staging: Optional[Path] = None) -> Any:
        from prune_pack.agent.verifier import verify_package

        return verify_package(pkg, trusted_keys=self.agent.trusted_keys, revoked_keys=self.agent.revoked_keys,
                              max_bytes=int(self.agent.max_package_mb * MiB), allow_unsigned=False,
                              staging_root=staging or self.store.staging_dir)

    def _fetched(self, args: dict) -> Fetched:
        return Fetched(self.agent, self.store.new_staging, args)


def cli_agent_run(args: Any, cfg: Any) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    d = Daemon.from_config(cfg)
    # Handlers first: a SIGTERM during a slow start-up (model load) still ends in a clean stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: d.request_stop())
    d.start()
    d.run(install_signals=False)
    return None
