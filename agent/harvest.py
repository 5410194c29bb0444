"""Harvest: a bounded on-disk pool of a stream's own frames, for recovery on the host (issue 15).

Streams opt in (``streams[].harvest: true``; off by default: frames of a plant leave the device
only when the operator asks for it). After inference, a worker calls ``Harvester.offer`` with the
frame and its detections; ``offer`` is cheap and never blocks:

    per-stream interval (``harvest.interval_s``) -> 32x32 gray thumbnail, near-duplicate of a kept
    (or queued) frame of that stream? skip -> uncertainty score from the detections -> bounded
    queue (full: drop, counted) -> writer thread: free-disk floor, quota (count, MB) by evicting
    the least useful frame (lowest score, then oldest), JPEG + JSON sidecar.

A JPEG is complete once its sidecar exists (the sidecar is written last and records the JPEG's
size and sha256); ``FramePool.open`` rebuilds the index from the sidecars and removes orphans,
so a restart keeps the pool. Disk errors (read-only, full, below the floor) pause harvesting
with a reason (telemetry ``harvest.state``/``reason``) and retry after ``retry_s``; never raise
into inference.

``list_frames(folder)`` is the one reader of a frames folder (pulled or copied by hand) for the
host's build. This module imports numpy and OpenCV only (device side, torch-free).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np

from prune_pack.agent.settings import HarvestSection
from prune_pack.errors import ReasonedError, UserInputError

log = logging.getLogger("prune_pack.agent.harvest")

MiB = 1024 * 1024
THUMB = 32  # descriptor: a THUMB x THUMB gray thumbnail (INTER_AREA averages ~300 pixels per cell at 640x480)
CELL_DELTA = 12  # gray levels: a cell "changed" above this (measured: sensor noise + codec stays under 4, bench/harvest.py)
SCHEMA = "harvest-frame/1"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}_[0-9]{13}(_[0-9]{1,4})?\.jpg$")


class FramesError(ReasonedError):
    """A frames command that cannot be served; ``reason`` is a stable code for MQTT answers."""


# ---------------------------------------------------------------------- descriptors and scores


def descriptor(img_bgr: np.ndarray) -> np.ndarray:
    """A 32x32 gray thumbnail (uint8, flat): area-averaged, so pixel noise mostly cancels."""
    small = cv2.resize(img_bgr, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    if small.ndim == 3:
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    return small.reshape(-1)


def changed_fraction(desc: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Share of thumbnail cells that differ by more than ``CELL_DELTA`` from each kept descriptor.

    A share, not a mean difference: a person walking into a fixed camera's view changes a few
    cells a lot, which a mean over the whole frame would dilute below the noise.
    """
    if kept.size == 0:
        return np.ones(0, np.float32)
    diff = np.abs(kept.astype(np.int16) - desc.astype(np.int16)[None, :])
    return (diff > CELL_DELTA).mean(1, dtype=np.float32)


def uncertainty(det: np.ndarray, below: float) -> tuple[float, int]:
    """(score in [0, 1), detections under ``below``): how unsure the model was on this frame.

    The score is 1 - the mean confidence of the frame's detections (0 without detections).
    Measured on coco128 with YOLOv8n at conf 0.25 (bench/harvest.py --measure, docs/benchmarks.md):
    its rank correlation with the per-image error (false + missed boxes at IoU 0.5) is 0.61,
    against 0.47 for the number of detections under 0.5, 0.45 for 1 - the lowest confidence
    and 0.18 for the number of detections.
    """
    if det is None or not len(det):
        return 0.0, 0
    c = np.asarray(det)[:, 4]
    return round(float(1.0 - c.mean()), 4), int((c < below).sum())


# ---------------------------------------------------------------------- the pool on disk


@dataclass
class FrameEntry:
    name: str
    stream: str
    ts_ms: int
    score: float
    bytes: int  # JPEG + sidecar
    sha256: str  # of the JPEG
    meta: dict  # the sidecar
    desc: np.ndarray

    @property
    def key(self) -> tuple[float, int]:
        """Eviction order: the least useful first (lowest score, then oldest)."""
        return (self.score, self.ts_ms)


def _pause_reason(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"{e.strerror or type(e).__name__}"


class FramePool:
    """The pool folder and its in-memory index (guarded by ``lock``)."""

    def __init__(self, root: Path, cfg: HarvestSection) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.lock = threading.Lock()
        self.entries: dict[str, FrameEntry] = {}
        self.total_bytes = 0
        self._descs: dict[str, np.ndarray] = {}  # stream -> stacked descriptors (rebuilt when dirty)
        self._dirty: set[str] = set()

    # ------------------------------------------------------------ index
    def open(self) -> list[str]:
        """Rebuild the index from the sidecars; removes temp files, orphans and torn pairs. Notes returned."""
        notes: list[str] = []
        self.root.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        for p in sorted(self.root.iterdir()):
            if p.name.startswith("."):  # temp files of an interrupted write
                p.unlink(missing_ok=True)
                notes.append(f"removed temp file {p.name}")
                continue
            if p.suffix != ".json":
                continue
            jpg = p.with_suffix(".jpg")
            entry = self._load_entry(p, jpg)
            if entry is None:
                p.unlink(missing_ok=True)
                jpg.unlink(missing_ok=True)
                notes.append(f"removed incomplete frame {jpg.name}")
                continue
            self._index(entry)
            seen.add(jpg.name)
        for p in self.root.glob("*.jpg"):
            if p.name not in seen:
                p.unlink(missing_ok=True)
                notes.append(f"removed orphan {p.name}")
        return notes

    def _load_entry(self, side: Path, jpg: Path) -> Optional[FrameEntry]:
        try:
            meta = json.loads(side.read_text())
            size = jpg.stat().st_size
            if meta.get("schema") != SCHEMA or meta.get("jpeg_bytes") != size or not _NAME.match(jpg.name):
                return None
            desc = np.frombuffer(base64.b64decode(meta["thumb"]), np.uint8)
            if desc.size != THUMB * THUMB:
                return None
            return FrameEntry(jpg.name, str(meta["stream"]), int(meta["ts_ms"]), float(meta["score"]),
                              size + side.stat().st_size, str(meta["sha256"]), meta, desc)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _index(self, e: FrameEntry) -> None:
        self.entries[e.name] = e
        self.total_bytes += e.bytes
        self._dirty.add(e.stream)

    def _unindex(self, e: FrameEntry) -> None:
        self.entries.pop(e.name, None)
        self.total_bytes -= e.bytes
        self._dirty.add(e.stream)

    def descriptors(self, stream: str) -> np.ndarray:
        """(N, THUMB*THUMB) descriptors of the stream's kept frames (call with ``lock`` held)."""
        if stream in self._dirty or stream not in self._descs:
            rows = [e.desc for e in self.entries.values() if e.stream == stream]
            self._descs[stream] = np.stack(rows) if rows else np.zeros((0, THUMB * THUMB), np.uint8)
            self._dirty.discard(stream)
        return self._descs[stream]

    # ------------------------------------------------------------ writing
    def make_room(self, new_bytes: int, new_key: tuple[float, int]) -> Optional[list[FrameEntry]]:
        """Entries to evict so one more frame fits the quotas, or None when the new frame is the
        least useful of all (then it is not kept). Call with ``lock`` held."""
        max_bytes = self.cfg.max_mb * MiB
        count, total = len(self.entries), self.total_bytes
        victims: list[FrameEntry] = []
        ordered = iter(sorted(self.entries.values(), key=lambda e: e.key))
        while count + 1 > self.cfg.max_frames or total + new_bytes > max_bytes:
            e = next(ordered, None)
            if e is None or e.key > new_key:
                return None
            victims.append(e)
            count, total = count - 1, total - e.bytes
        return victims

    def remove(self, e: FrameEntry) -> None:
        """Delete one frame (sidecar first: a JPEG without its sidecar is an orphan, cleaned at open)."""
        (self.root / e.name).with_suffix(".json").unlink(missing_ok=True)
        (self.root / e.name).unlink(missing_ok=True)
        with self.lock:
            self._unindex(e)

    @staticmethod
    def sidecar(meta: dict, jpeg: bytes, desc: np.ndarray) -> tuple[dict, bytes]:
        """The full sidecar (with the JPEG's size and sha256 and the descriptor) and its bytes."""
        meta = {**meta, "jpeg_bytes": len(jpeg), "sha256": hashlib.sha256(jpeg).hexdigest(),
                "thumb": base64.b64encode(desc.tobytes()).decode("ascii")}
        return meta, json.dumps(meta, separators=(",", ":")).encode()

    def write(self, name: str, jpeg: bytes, meta: dict, side_bytes: bytes, desc: np.ndarray) -> FrameEntry:
        """Write JPEG then sidecar (each via a temp file and rename); raises OSError."""
        jpg = self.root / name
        side = jpg.with_suffix(".json")
        for path, data in ((jpg, jpeg), (side, side_bytes)):
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError:
                tmp.unlink(missing_ok=True)
                if path is side:
                    jpg.unlink(missing_ok=True)
                raise
        e = FrameEntry(name, meta["stream"], meta["ts_ms"], meta["score"], len(jpeg) + len(side_bytes),
                       meta["sha256"], meta, desc)
        with self.lock:
            self._index(e)
        return e

    def unique_name(self, stream: str, ts_ms: int) -> str:
        name = f"{stream}_{ts_ms:013d}.jpg"
        i = 0
        while name in self.entries or (self.root / name).exists():
            i += 1
            name = f"{stream}_{ts_ms:013d}_{i}.jpg"
        return name

    # ------------------------------------------------------------ reading (frames-list / frames-read)
    def listing(self, since_ms: int = 0, after: Optional[str] = None, limit: int = 500) -> tuple[list[dict], bool]:
        """Frames kept at or after ``since_ms``, oldest first, after the frame named ``after`` (paging)."""
        start = _order_of(after) if after else (-1, "")
        with self.lock:
            rows = sorted((e for e in self.entries.values() if e.ts_ms >= since_ms and (e.ts_ms, e.name) > start),
                          key=lambda e: (e.ts_ms, e.name))
        out = [{"name": e.name, "size": e.meta["jpeg_bytes"], "sha256": e.sha256,
                "sidecar": {k: v for k, v in e.meta.items() if k != "thumb"}} for e in rows[:limit]]
        return out, len(rows) > limit

    def read(self, name: str, offset: int, length: int) -> tuple[bytes, int]:
        """(bytes at offset, file size) of a kept frame; FramesError for unknown names."""
        if not _NAME.match(name):
            raise FramesError("bad_request", f"not a frame name: {name!r}")
        with self.lock:
            known = name in self.entries
        if not known:
            raise FramesError("not_found", f"{name} is not in the pool (evicted?)")
        try:
            with open(self.root / name, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if offset > size:
                    raise FramesError("bad_request", f"offset {offset} beyond the end of {name} ({size} bytes)")
                f.seek(offset)
                return f.read(length), size
        except FileNotFoundError:
            raise FramesError("not_found", f"{name} was removed") from None
        except OSError as e:
            raise FramesError("read_failed", f"{name}: {e.strerror or e}") from None


# ---------------------------------------------------------------------- the harvester


@dataclass
class _Item:
    stream: str
    img: np.ndarray
    ts_ms: int
    det: np.ndarray
    model: Optional[dict]


class Harvester:
    """Sampling, the writer thread and the pool's state for telemetry; see the module docstring.

    ``model_info()`` (optional) returns the active model's summary for the sidecars.
    """

    def __init__(self, cfg: HarvestSection, root: Path, model_info: Optional[Callable[[], Optional[dict]]] = None
                 ) -> None:
        self.cfg = cfg
        self.pool = FramePool(root, cfg)
        self.model_info = model_info
        self._q: queue.Queue = queue.Queue(maxsize=max(1, cfg.queue))
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self.counts: Counter[str] = Counter()
        self.state, self.reason = "starting", None
        self._retry_at = 0.0
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._pace_lock = threading.Lock()
        self._pace_t = 0.0

    # ------------------------------------------------------------ life cycle
    def start(self, enabled: bool = True) -> None:
        """Rebuild the pool index (a failure pauses, never raises) and start the writer thread.

        ``enabled=False`` (no stream harvests): state ``off``; the kept pool can still be read."""
        try:
            for note in self.pool.open():
                log.warning("harvest pool: %s", note)
            if enabled:
                self._resume()
            else:
                self.state, self.reason = "off", None
        except OSError as e:
            self._pause(_pause_reason(e), e)
        self._thread = threading.Thread(target=self._writer, name="harvest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)

    def _pause(self, reason: str, exc: Optional[BaseException] = None) -> None:
        with self._lock:
            changed = self.state != "paused" or self.reason != reason
            self.state, self.reason = "paused", reason
            self._retry_at = time.monotonic() + self.cfg.retry_s
        if changed:
            log.warning("harvest paused: %s%s", reason, f" ({exc})" if exc else "")

    def _resume(self) -> None:
        with self._lock:
            if self.state != "active":
                log.info("harvest active: %s (%d frames)", self.pool.root, len(self.pool.entries))
            self.state, self.reason = "active", None

    # ------------------------------------------------------------ the inference side
    def offer(self, stream: str, img: np.ndarray, wall: float, det: np.ndarray, model: Optional[dict] = None) -> str:
        """Consider one inferred frame: "interval" (not due), "paused", "queued", "queue_full" or "error".

        Costs a dict lookup and a ``put_nowait``: thumbnails, dedup, scoring, JPEG and disk all
        happen on the writer thread, so inference never waits for harvesting. Never raises.
        """
        try:
            return self._offer(stream, img, wall, det, model)
        except Exception as e:  # noqa: BLE001 - harvesting must never stop inference
            self._count("errors")
            log.warning("harvest: offer failed: %s", e)
            return "error"

    def _offer(self, stream: str, img: np.ndarray, wall: float, det: np.ndarray, model: Optional[dict]) -> str:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(stream, 0.0):
                return "interval"
            self._next[stream] = now + self.cfg.interval_s
            if self.state == "paused" and now < self._retry_at:
                self.counts["skipped_paused"] += 1
                return "paused"
            self.counts["sampled"] += 1
            try:
                self._q.put_nowait(_Item(stream, img, int(wall * 1000), det, model))
            except queue.Full:
                self.counts["dropped_queue_full"] += 1
                return "queue_full"
        return "queued"

    # ------------------------------------------------------------ the writer thread
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def _writer(self) -> None:
        while not self._stop.is_set():
            item = self._q.get()
            if item is None:
                return
            try:
                self._store(item)
            except Exception as e:  # noqa: BLE001 - the writer must survive anything; counted and paused
                self._count("errors")
                self._pause(f"{type(e).__name__}: {str(e)[:200]}", e)
            finally:
                self._q.task_done()

    def _store(self, it: _Item) -> None:
        with self._lock:
            if self.state == "paused" and time.monotonic() < self._retry_at:
                self.counts["skipped_paused"] += 1
                return
        desc = descriptor(it.img)
        with self.pool.lock:
            near = changed_fraction(desc, self.pool.descriptors(it.stream))
        novelty = float(near.min()) if near.size else 1.0
        if novelty < self.cfg.dedup_fraction:
            self._count("skipped_duplicate")
            return
        score, unsure = uncertainty(it.det, self.cfg.uncertain_below)
        ok, buf = cv2.imencode(".jpg", it.img, [cv2.IMWRITE_JPEG_QUALITY, int(self.cfg.jpeg_quality)])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        jpeg = buf.tobytes()
        try:
            self.pool.root.mkdir(parents=True, exist_ok=True)
            free_mb = shutil.disk_usage(self.pool.root).free / MiB
        except OSError as e:
            self._pause(_pause_reason(e), e)
            return
        if self.cfg.min_free_mb > 0 and free_mb - len(jpeg) / MiB < self.cfg.min_free_mb:
            self._count("skipped_floor")
            self._pause(f"free disk {free_mb:.0f} MB is under the floor harvest.min_free_mb={self.cfg.min_free_mb:g}")
            return
        h, w = it.img.shape[:2]
        why = "uncertain" if unsure else "novel"
        meta = {"schema": SCHEMA, "stream": it.stream, "ts_ms": it.ts_ms,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(it.ts_ms / 1000)) + f".{it.ts_ms % 1000:03d}Z",
                "model": it.model if it.model is not None else (self.model_info() if self.model_info else None),
                "why": why, "score": score, "unsure_detections": unsure, "detections": 0 if it.det is None else len(it.det),
                "novelty": round(novelty, 4), "width": w, "height": h}
        meta, side = self.pool.sidecar(meta, jpeg, desc)
        with self.pool.lock:
            victims = self.pool.make_room(len(jpeg) + len(side), (score, it.ts_ms))
            name = self.pool.unique_name(it.stream, it.ts_ms) if victims is not None else ""
        if victims is None:
            self._count("rejected_low_score")
            return
        try:
            for v in victims:
                self.pool.remove(v)
                self._count("evicted")
            self.pool.write(name, jpeg, meta, side, desc)
        except OSError as e:
            self._pause(_pause_reason(e), e)
            return
        self._count("kept")
        self._count(f"kept_{why}")
        self._resume()

    # ------------------------------------------------------------ reading, pacing, status
    def pace(self, nbytes: int) -> float:
        """Sleep so frames-read answers stay under ``pull_kbps`` on average; returns the seconds slept."""
        rate = max(1.0, self.cfg.pull_kbps) * 1024
        with self._pace_lock:
            now = time.monotonic()
            start = max(now, self._pace_t)
            self._pace_t = start + nbytes / rate
            wait = start - now
        if wait > 0:
            time.sleep(wait)
        return wait

    def status(self) -> dict[str, Any]:
        """Telemetry: state (active/paused), reason, pool size and the counters since start."""
        with self.pool.lock:
            frames, total = len(self.pool.entries), self.pool.total_bytes
        with self._lock:
            state, reason = self.state, self.reason
            counts = dict(self.counts)
        keys = ("sampled", "kept", "kept_uncertain", "kept_novel", "skipped_duplicate", "skipped_paused",
                "skipped_floor", "dropped_queue_full", "rejected_low_score", "evicted", "errors")
        return {"state": state, "reason": reason, "dir": str(self.pool.root), "frames": frames,
                "mb": round(total / MiB, 2), "max_frames": self.cfg.max_frames, "max_mb": self.cfg.max_mb,
                **{k: counts.get(k, 0) for k in keys}}

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until the writer queue is empty (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._q.unfinished_tasks == 0:  # taken and finished (task_done after each item)
                return True
            time.sleep(0.01)
        return False


def _order_of(name: str) -> tuple[int, str]:
    """A frame name's place in the listing order (its time, then the name)."""
    m = re.match(r"^.*_([0-9]{13})(?:_[0-9]+)?\.jpg$", name)
    return (int(m.group(1)) if m else -1, name)


def pool_dir(cfg: HarvestSection, state_dir: str | Path) -> Path:
    return Path(cfg.dir) if cfg.dir else Path(state_dir) / "harvest"


# ---------------------------------------------------------------------- the host's reader


def list_frames(folder: str | Path) -> list[Path]:
    """The images of a frames folder (``frames pull``'s output or one copied by hand), sorted.

    Any JPEG/PNG/BMP/WebP under ``folder`` (recursively) counts; sidecars are optional. Skipped:
    hidden and partial files (``.part``, temp files of an interrupted pull) and empty files.
    A missing folder is a ``UserInputError``; an empty one returns [].
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserInputError(f"frames folder not found: {root}")
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or p.suffix.lower() not in IMAGE_EXTS:
            continue
        try:
            if p.is_file() and p.stat().st_size > 0:
                out.append(p)
        except OSError:
            continue
    return sorted(out)
