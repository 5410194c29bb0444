"""``prune-pack dashboard``: a live fleet page (host extra: Starlette + uvicorn).

The server is the only MQTT client (browsers never talk to the broker: they would need its
credentials). It keeps ``deploy.fleetstate.FleetState`` fed (``fleet_filters``) and pushes the
fleet table to every open page with server-sent events (``/events``), at most every
``PUSH_INTERVAL_S`` and only when something changed (plus a heartbeat, so ages move). The page
(``deploy/static/``: one HTML file, one script, uPlot vendored from npm, no build step) shows
state (online / offline / lost), model and version, p95 vs target, fps, drops, CPU/RSS and last
seen per device, one device's latency over time against its target, the models in the fleet, and
``prune-pack rollout``'s progress (its retained ``{prefix}/_rollout/{ID}`` state).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from prune_pack.deploy.fleetstate import Device, FleetState, connect_fleet

STATIC = Path(__file__).resolve().parent / "static"
PUSH_INTERVAL_S = 0.25  # at most this often per page
HEARTBEAT_S = 2.0  # a push even without news: the "last seen" ages advance


def fleet_view(state: FleetState, device: Optional[str] = None) -> dict[str, Any]:
    """What one push carries: the table, the models in the fleet, and one device's chart series."""
    now = time.time()
    devices = state.snapshot()
    rows = [d.row(now) for d in devices]
    models: dict[str, int] = {}
    for r in rows:
        if r["model"] is not None:
            label = f"{r['model']} v{r['version']}"
            models[label] = models.get(label, 0) + 1
    view: dict[str, Any] = {"ts": now, "devices": rows,
                            "rollout": [{"model": k, "devices": n} for k, n in sorted(models.items())],
                            "rollouts": sorted(state.rollout_list(), key=lambda r: -(r["ts_ms"] or 0))[:3]}
    key = device if any(d.key == device for d in devices) else (devices[0].key if devices else None)
    chosen = state.get(key) if key else None  # the one device whose history is copied
    if chosen is not None:
        view["chart"] = _chart(chosen)
    return view


def _chart(d: Device) -> dict[str, Any]:
    """Columns for uPlot: time (s) and, per stream, the device's p95 (ms); the target as a constant series."""
    streams = sorted(d.history)
    ts = sorted({p[0] for s in streams for p in d.history[s]})
    index = {t: i for i, t in enumerate(ts)}
    series = []
    for s in streams:
        col: list[Optional[float]] = [None] * len(ts)
        for t, p95 in d.history[s]:
            col[index[t]] = p95
        series.append({"stream": s, "p95_ms": col})
    return {"device": d.key, "target_ms": d.target_ms, "t": ts, "series": series}


class Dashboard:
    """The MQTT subscriber and the web app; ``start()`` serves in a thread (tests and the CLI)."""

    def __init__(self, mqtt: Any, listen: str = "127.0.0.1:8108", history_points: int = 720) -> None:
        self.mqtt, self.listen = mqtt, listen
        self.version = 0
        self._vlock = threading.Lock()
        self.state = FleetState(mqtt.prefix, on_change=self._changed, history_points=history_points)
        self.client: Any = None
        self.server: Any = None
        self.thread: Optional[threading.Thread] = None
        self.port = 0

    def _changed(self, dev: Optional[Device]) -> None:
        with self._vlock:
            self.version += 1

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import FileResponse, JSONResponse, StreamingResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        async def index(request: Any) -> Any:
            return FileResponse(STATIC / "index.html")

        async def fleet(request: Any) -> Any:
            return JSONResponse(fleet_view(self.state, request.query_params.get("device")))

        async def events(request: Any) -> Any:
            return StreamingResponse(self._events(request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        return Starlette(routes=[Route("/", index), Route("/api/fleet", fleet), Route("/events", events),
                                 Mount("/static", StaticFiles(directory=STATIC), name="static")])

    async def _events(self, request: Any) -> AsyncIterator[str]:
        device = request.query_params.get("device")
        seen, last = -1, 0.0
        yield "retry: 1000\n\n"
        while not await request.is_disconnected():
            with self._vlock:
                v = self.version
            now = time.monotonic()
            if v != seen or now - last >= HEARTBEAT_S:
                seen, last = v, now
                yield f"event: fleet\ndata: {json.dumps(fleet_view(self.state, device), separators=(',', ':'))}\n\n"
            await asyncio.sleep(PUSH_INTERVAL_S)

    def start(self) -> "Dashboard":
        import uvicorn

        from prune_pack.deploy.exporter import parse_listen

        host, port = parse_listen(self.listen)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.port = sock.getsockname()[1]
        self.client = connect_fleet(self.mqtt, self.state, f"prune-pack-dashboard-{uuid.uuid4().hex[:10]}")
        self.server = uvicorn.Server(uvicorn.Config(self.app(), log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="dashboard", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.server.force_exit = True  # open event streams would otherwise hold the shutdown
        if self.thread is not None:
            self.thread.join(10)
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def cli_dashboard(args: Any, cfg: Any) -> dict:
    """Serve until SIGTERM/SIGINT."""
    import dataclasses
    import signal
    import sys

    from prune_pack.agent.mqtt import redact
    from prune_pack.agent.settings import merged
    from prune_pack.errors import MissingExtraError

    for mod in ("starlette", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            raise MissingExtraError("prune-pack dashboard", "host", mod) from None
    dc = merged(cfg.dashboard, listen=args.listen)
    mqtt = dataclasses.replace(cfg.mqtt, broker=args.broker or cfg.mqtt.broker)
    db = Dashboard(mqtt, dc.listen, dc.history_points).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host = dc.listen.rpartition(":")[0] or "127.0.0.1"
    print(f"dashboard: http://{host}:{db.port}/ for the fleet under {mqtt.prefix}/ on {redact(mqtt.broker)}", file=sys.stderr)
    try:
        while not stop.wait(1.0) and db.thread is not None and db.thread.is_alive():
            pass
    finally:
        db.stop()
    return {"summary": "dashboard stopped", "devices": len(db.state.devices)}
