"""Harvested frames on the host: ``prune-pack frames pull`` and ``prune-pack frames stats``.

``pull`` lists a device's pool (``frames-list``, paged) and fetches each frame chunk by chunk
(``frames-read``) through ``RemoteDevice.call``, one chunk in flight (the device paces its
answers). Every chunk is checked against its sha256 (a bad one is asked again), every file against
the sha256 its sidecar recorded when it was harvested. Resumable: a frame already in ``--out``
with the right sha256 is skipped; a ``NAME.part`` file is continued from its size. A dropped
broker or device (no answer) reconnects with backoff for up to ``--retry-s`` seconds; after that
the pull stops with a one-line error, and running it again resumes.

Output: ``DIR/NAME.jpg`` + ``DIR/NAME.json`` (the device's sidecar). The build reads a frames
folder, pulled or copied by hand, with ``prune_pack.agent.harvest.list_frames``.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from prune_pack.agent.harvest import list_frames
from prune_pack.agent.mqtt import redact
from prune_pack.agent.settings import MqttSection
from prune_pack.deploy.remote import RemoteCommandError, RemoteDevice
from prune_pack.errors import DeviceUnavailable, PrunePackError, UserInputError

MiB = 1024 * 1024
CHUNK_TRIES = 3  # a chunk whose sha256 does not match is asked again this many times
FILE_TRIES = 2  # a file whose sha256 does not match is fetched again from the start once
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}_[0-9]{13}(_[0-9]{1,4})?\.jpg$")


class FramesPullError(PrunePackError):
    """A pull that could not finish (frames that failed their checks); rerunning resumes."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_since(text: Optional[str], now: Optional[float] = None) -> int:
    """``--since``: ISO date/time (UTC unless it has an offset), epoch seconds, or an age like
    ``90m``, ``12h``, ``7d``; returns milliseconds since the epoch (0 when not given)."""
    if not text:
        return 0
    s = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", s)
    if m:
        secs = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int(((now if now is not None else time.time()) - secs) * 1000)
    if re.fullmatch(r"\d{9,11}(\.\d+)?", s):
        return int(float(s) * 1000)
    from datetime import datetime, timezone

    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise UserInputError(f"--since {text!r}: give an ISO time (2026-12-01T08:00), epoch seconds or an age (12h, 7d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(calendar.timegm(dt.utctimetuple()) * 1000 + dt.microsecond // 1000)


class _Link:
    """A RemoteDevice that reconnects: every call is retried (new connection, backoff) until it
    answers or ``retry_s`` of failures in a row have passed."""

    def __init__(self, factory: Callable[[], RemoteDevice], retry_s: float, timeout: float,
                 log: Callable[[str], None]) -> None:
        self.factory, self.retry_s, self.timeout, self.log = factory, retry_s, timeout, log
        self.dev: Optional[RemoteDevice] = None
        self.reconnects = 0

    def call(self, cmd: str, args: dict) -> dict:
        failing_since: Optional[float] = None
        backoff = 0.5
        while True:
            try:
                if self.dev is None:
                    self.dev = self.factory()
                    self.dev.connect()
                return self.dev.call(cmd, args, timeout=self.timeout, retries=0)
            except DeviceUnavailable as e:
                now = time.monotonic()
                failing_since = failing_since or now
                self.close()
                if now - failing_since > self.retry_s:
                    raise DeviceUnavailable(f"{e} (gave up after {self.retry_s:g} s; run the pull again to resume)") from None
                self.log(f"frames pull: {e}; reconnecting in {backoff:.1f} s")
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self.reconnects += 1

    def close(self) -> None:
        if self.dev is not None:
            try:
                self.dev.close()
            except Exception:  # noqa: BLE001 - a dead connection may fail to close; it is dropped anyway
                pass
            self.dev = None


def _listing(link: _Link, since_ms: int) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    after: Optional[str] = None
    pool: dict = {}
    while True:
        args: dict[str, Any] = {"since_ts_ms": since_ms, "limit": 500}
        if after:
            args["after"] = after
        res = link.call("frames-list", args)
        pool = res.get("pool") or {}
        page = [r for r in res.get("frames", []) if isinstance(r, dict) and _SAFE.match(str(r.get("name", "")))]
        rows += page
        if not res.get("more") or not page:
            return rows, pool
        after = page[-1]["name"]


def _fetch(link: _Link, entry: dict, out: Path, counts: Counter) -> str:
    """Fetch one frame into ``out``; returns "fetched", "gone" or "sha256_mismatch"."""
    name, want = entry["name"], entry["sha256"]
    part = out / (name + ".part")
    for attempt in range(FILE_TRIES):
        offset = part.stat().st_size if part.exists() else 0
        if offset:
            counts["resumed"] += 1
        with open(part, "ab") as f:
            while True:
                res, stale_part = None, False
                for _ in range(CHUNK_TRIES):
                    try:
                        res = link.call("frames-read", {"name": name, "offset": offset})
                    except RemoteCommandError as e:
                        if e.reason == "not_found":  # evicted on the device since the listing
                            part.unlink(missing_ok=True)
                            return "gone"
                        if e.reason == "bad_request" and offset:  # a .part longer than the device's file
                            stale_part = True
                            break
                        raise
                    data = base64.b64decode(res.get("data_b64", ""))
                    if hashlib.sha256(data).hexdigest() == res.get("sha256") and res.get("offset") == offset:
                        break
                    counts["bad_chunks"] += 1
                    res = None
                if stale_part:
                    break  # the file check below fails and the next attempt starts from 0
                if res is None:
                    raise FramesPullError(f"{name}: {CHUNK_TRIES} chunks at offset {offset} failed their sha256 check")
                f.write(data)
                offset += len(data)
                counts["bytes"] += len(data)
                if res.get("eof") or not data:
                    break
            f.flush()
            os.fsync(f.fileno())
        if sha256_file(part) == want:
            os.replace(part, out / name)
            return "fetched"
        counts["bad_files"] += 1
        part.unlink(missing_ok=True)
    return "sha256_mismatch"


def pull(factory: Callable[[], RemoteDevice], out: Path, max_frames: Optional[int] = None, since_ms: int = 0,
         retry_s: float = 120.0, timeout: float = 30.0, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
         ) -> dict:
    """Bring a device's harvested frames into ``out`` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    link = _Link(factory, retry_s, timeout, log)
    counts: Counter[str] = Counter()
    failed: list[dict] = []
    t0 = time.monotonic()
    try:
        rows, pool = _listing(link, since_ms)
        for entry in rows:
            name = entry["name"]
            target = out / name
            side = out / (name[:-4] + ".json")
            if target.exists() and sha256_file(target) == entry["sha256"]:
                counts["present"] += 1
            elif max_frames is not None and counts["fetched"] >= max_frames:
                continue
            else:
                target.unlink(missing_ok=True)
                got = _fetch(link, entry, out, counts)
                counts[got] += 1
                if got == "sha256_mismatch":
                    failed.append({"name": name, "reason": "sha256_mismatch"})
                    continue
                if got == "gone":
                    continue
            if not side.exists():
                side.write_text(json.dumps(entry.get("sidecar") or {}, indent=1))
    finally:
        link.close()
    res = {"out": str(out), "listed": len(rows), "fetched": counts["fetched"], "present": counts["present"],
           "gone": counts["gone"], "failed": failed, "resumed": counts["resumed"], "bad_chunks": counts["bad_chunks"],
           "bad_files": counts["bad_files"], "mb": round(counts["bytes"] / MiB, 3), "reconnects": link.reconnects,
           "seconds": round(time.monotonic() - t0, 1), "device_pool": pool, "frames_in_out": len(list_frames(out))}
    if failed:
        raise FramesPullError(f"{len(failed)} frame(s) failed their sha256 check after {FILE_TRIES} tries "
                              f"(first: {failed[0]['name']}); {res['fetched']} fetched, {res['present']} already present")
    return res


def folder_stats(folder: Path) -> dict:
    """Counts of a frames folder as the build will read it (list_frames), with sidecar facts."""
    frames = list_frames(folder)
    by_stream: Counter[str] = Counter()
    why: Counter[str] = Counter()
    ts: list[int] = []
    sidecars = 0
    for p in frames:
        side = p.with_suffix(".json")
        meta: dict = {}
        if side.is_file():
            try:
                meta = json.loads(side.read_text())
                sidecars += 1
            except (OSError, ValueError):
                meta = {}
        by_stream[str(meta.get("stream", "?"))] += 1
        why[str(meta.get("why", "?"))] += 1
        if isinstance(meta.get("ts_ms"), int):
            ts.append(meta["ts_ms"])
    partial = [p.name for p in folder.rglob("*.part")]
    fmt = lambda ms: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))  # noqa: E731
    return {"dir": str(folder), "frames": len(frames), "mb": round(sum(p.stat().st_size for p in frames) / MiB, 2),
            "with_sidecar": sidecars, "partial": len(partial), "by_stream": dict(by_stream), "why": dict(why),
            "first": fmt(min(ts)) if ts else None, "last": fmt(max(ts)) if ts else None}


# ---------------------------------------------------------------- CLI


def _factory(cfg: Any, device: str, broker: Optional[str]) -> Callable[[], RemoteDevice]:
    mqtt: MqttSection = cfg.mqtt
    return lambda: RemoteDevice(mqtt, device, cfg.device.site, broker=broker)


def cli_frames_pull(args: Any, cfg: Any) -> dict:
    if args.max is not None and args.max < 0:
        raise UserInputError("--max must be >= 0")
    res = pull(_factory(cfg, args.device, args.broker), Path(args.out), args.max, parse_since(args.since),
               retry_s=args.retry_s, timeout=args.timeout)
    res["device"] = args.device
    res["summary"] = (f"{args.device}: {res['fetched']} frame(s) fetched ({res['mb']} MB), {res['present']} already in "
                      f"{args.out}, {res['gone']} evicted meanwhile; {res['frames_in_out']} frames in {args.out}")
    return res


def cli_frames_stats(args: Any, cfg: Any) -> dict:
    if bool(args.dir) == bool(args.device):
        raise UserInputError("give a frames folder or --device ID (one of them)")
    if args.dir:
        res = folder_stats(Path(args.dir))
        res["summary"] = (f"{res['dir']}: {res['frames']} frames, {res['mb']} MB, streams {res['by_stream']}, "
                          f"{res['first']} .. {res['last']}" + (f", {res['partial']} partial" if res["partial"] else ""))
        return res
    with RemoteDevice(cfg.mqtt, args.device, cfg.device.site, broker=args.broker) as dev:
        res = dev.call("frames-list", {"limit": 0}, timeout=args.timeout)
    pool = res.get("pool") or {}
    return {"device": args.device, "broker": redact(args.broker or cfg.mqtt.broker or ""), "pool": pool,
            "summary": f"{args.device}: harvest {pool.get('state')}" + (f" ({pool.get('reason')})" if pool.get("reason") else "")
                       + f", {pool.get('frames')} frames, {pool.get('mb')} MB of {pool.get('max_mb')}"}
