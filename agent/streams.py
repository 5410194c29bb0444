"""Multi-stream video inference: one capture thread per stream, shared inference workers.

Frame life cycle (every frame that is read ends in exactly one bucket, so
``read == processed + dropped + in_flight`` at any time, and ``in_flight == 0`` after ``stop``):

    capture thread ──read──▶ per-stream queue (``queue`` frames; full: the oldest is dropped,
    ``queue_full``; ``policy: block`` makes the reader wait instead) ──▶ a worker takes the
    oldest head frame of all streams ──▶ ``stale`` (older than ``max_age_ms``), ``error`` (the
    model raised), ``no_model`` or processed. Frames still queued at ``stop`` are ``stopped``;
    live frames skipped by ``fps_limit`` are ``fps_limit``.

Counters (frames read / processed / dropped by reason, detections by class) and the cumulative
latency histogram (``LATENCY_BUCKETS_S``, with sum and count; ``count == frames_processed``) only
grow while the manager runs (since ``started_ts_ms``); a model swap does not reset them.

Workers share one session (``run`` is thread-safe on every backend); ``swap`` loads the new
session first and then replaces one reference under the lock: a worker snapshots the model
when it takes a frame, so frames in flight finish on the old model.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np

from prune_pack.agent.detect import Detector
from prune_pack.agent.metrics import LATENCY_BUCKETS_S, SAMPLE_WINDOW, LatencyHistogram
from prune_pack.agent.metrics import mark as _mark
from prune_pack.agent.metrics import percentiles as _percentiles
from prune_pack.agent.metrics import rate as _rate
from prune_pack.agent.settings import InferenceSection, StreamSection
from prune_pack.errors import UserInputError

log = logging.getLogger("prune_pack.agent.streams")

OPEN_TIMEOUT_MS = 5000  # network sources: give up opening / reading after this long
DEFAULT_FILE_FPS = 25.0  # a file whose container has no frame rate plays at this rate
DROP_REASONS = ("queue_full", "stale", "error", "no_model", "fps_limit", "stopped")

SessionFactory = Callable[[Path], Any]
DetectionsCallback = Callable[[str, dict], None]


def cpu_count() -> int:
    """Cores this process may run on (affinity / cgroup cpusets), not the machine's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def plan_parallelism(inference: InferenceSection, n_streams: int, cores: Optional[int] = None) -> tuple[int, int]:
    """(workers, threads per worker) with workers x threads <= cores; an explicit value always wins.

    Frame-level parallelism first, intra-op threads for the cores left: workers =
    min(cores, max(2, streams)), threads = cores // workers. Measured on 2 cores
    (bench/results/streams.md): 2 workers x 1 thread gave 2.0-2.2x the frames per second and
    ~1.9x the frames per CPU-second of 1 x 2, with 1 and with 2 streams (independent frames scale
    better than ORT's intra-op threads, which also spin between runs).
    """
    cores = cores or cpu_count()
    workers, threads = inference.workers, inference.threads
    if workers <= 0 and threads <= 0:
        workers = min(cores, max(2, n_streams))
        threads = max(1, cores // workers)
    elif workers <= 0:
        workers = max(1, min(max(2, n_streams), cores // threads))
    elif threads <= 0:
        threads = max(1, cores // workers)
    return workers, threads


def session_factory_for(inference: InferenceSection, n_streams: int, cache_dir: Optional[str | Path] = None
                        ) -> SessionFactory:
    """The factory a daemon hands to ``StreamManager``: ``load_session`` with the planned threads."""
    from prune_pack.agent.backends import load_session

    _, threads = plan_parallelism(inference, n_streams)

    def factory(path: Path) -> Any:
        return load_session(path, backend=inference.backend, precision=inference.precision, threads=threads,
                            cache_dir=cache_dir)

    return factory


def source_kind(source: str) -> str:
    """``device`` (V4L2 index or /dev/video*), ``url`` (rtsp/http/...) or ``file``."""
    s = source.strip()
    if s.isdigit() or s.startswith("/dev/video"):
        return "device"
    if "://" in s:
        return "url"
    return "file"


def open_capture(source: str) -> tuple[Optional[cv2.VideoCapture], str]:
    """An opened ``cv2.VideoCapture`` and "", or None and the one-line reason."""
    kind = source_kind(source)
    if kind == "file" and not Path(source).is_file():
        return None, f"file not found: {source}"
    try:
        if kind == "device":
            cap = cv2.VideoCapture(int(source) if source.isdigit() else source, cv2.CAP_V4L2)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver keeps the newest frame, not a backlog
        elif kind == "url":
            # Bounded waits: an unreachable camera must not hold the capture thread (or stop()) forever.
            cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                                                            cv2.CAP_PROP_READ_TIMEOUT_MSEC, OPEN_TIMEOUT_MS])
        else:
            cap = cv2.VideoCapture(source)
    except cv2.error as e:
        return None, f"cannot open {source}: {str(e).strip().splitlines()[-1][:200]}"
    if not cap.isOpened():
        cap.release()
        return None, f"cannot open {source}"
    return cap, ""


@dataclass
class _Frame:
    index: int
    img: np.ndarray
    t: float  # time.monotonic() when read
    wall: float  # time.time() when read, for payloads


@dataclass
class _Model:
    path: Optional[Path]
    session: Any
    detector: Detector
    loaded_at: float = field(default_factory=time.time)


class _Stream:
    """State of one stream; counters are guarded by the manager's lock."""

    def __init__(self, cfg: StreamSection, conf: float, lock: threading.Lock) -> None:
        self.cfg = cfg
        self.space = threading.Condition(lock)  # policy block: the reader waits here for room in its queue
        self.name = cfg.name
        self.kind = source_kind(cfg.source)
        self.conf = cfg.conf if cfg.conf is not None else conf
        self.queue: deque[_Frame] = deque()
        self.state = "down"
        self.reason: Optional[str] = "not started"
        self.read = 0
        self.processed = 0
        self.dropped: Counter[str] = Counter()
        self.in_worker = 0
        self.latency: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.hist = LatencyHistogram(LATENCY_BUCKETS_S)
        self.classes: Counter[str] = Counter()  # detections by class name, since start
        self.age: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.read_times: deque[float] = deque()
        self.proc_times: deque[float] = deque()
        self.opens = 0
        self.loops = 0
        self.errors = 0
        self.last_error: Optional[str] = None
        self.published = 0
        self.suppressed = 0
        self.publish_errors = 0
        self.output_errors = 0
        self.last_publish = -1e18
        self.sink_lock = threading.Lock()
        self.sink: Any = None
        self.thread: Optional[threading.Thread] = None

    def in_flight(self) -> int:
        return len(self.queue) + self.in_worker


class StreamManager:
    """Runs every configured stream through the active model; see the module docstring.

    ``session_factory(path) -> Session`` loads a model (used at start and by ``swap``);
    ``on_detections(stream, payload)`` is called from a worker thread at most
    ``detections_rate_hz`` times per second per stream whose ``publish_detections`` is set.
    """

    def __init__(self, streams: list[StreamSection], inference: InferenceSection, session_factory: SessionFactory,
                 names: Optional[dict[int, str]] = None, on_detections: Optional[DetectionsCallback] = None,
                 model_path: Optional[Path] = None, harvester: Any = None) -> None:
        if len({s.name for s in streams}) != len(streams):
            raise UserInputError("stream names must be unique")
        self.inference = inference
        self.session_factory = session_factory
        self.on_detections = on_detections
        self.workers, self.threads = plan_parallelism(inference, len(streams))
        self._lock = threading.Lock()
        self._streams = {s.name: _Stream(s, inference.conf, self._lock) for s in streams}
        self._have_frame = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._model: Optional[_Model] = None
        self._swaps = 0
        self._started_at: Optional[float] = None
        self._started_wall = 0.0
        self._cpu_mark: Optional[tuple[float, float]] = None
        self._cpu_pct: Optional[float] = None
        self._model_path = Path(model_path) if model_path else None
        self._names = names
        self.harvester = harvester  # agent.harvest.Harvester: offered every inferred frame of a stream with harvest on

    # ---------------------------------------------------------------- model

    def _load(self, model: Any, names: Optional[dict[int, str]]) -> _Model:
        path: Optional[Path] = None
        if isinstance(model, (str, Path)):
            path = Path(model)
            session = self.session_factory(path)
        else:  # an already-loaded Session (the architecture's swap(session) form)
            session = model
            path = getattr(session, "path", None)
        det = Detector(session, names, conf=self.inference.conf, iou=self.inference.iou, max_det=self.inference.max_det)
        return _Model(Path(path) if path else None, session, det)

    def swap(self, model: Path | str | Any, names: Optional[dict[int, str]] = None) -> dict[str, Any]:
        """Load ``model`` (a path for the factory, or a Session), then make it active atomically.

        A load failure raises and leaves the current model running. Streams never stop.
        """
        t0 = time.perf_counter()
        new = self._load(model, names)
        with self._lock:
            old, self._model = self._model, new
            self._swaps += 1
        return {"model": str(new.path) if new.path else None, "previous": str(old.path) if old and old.path else None,
                "load_ms": round((time.perf_counter() - t0) * 1e3, 1), "names": len(new.detector.names)}

    @property
    def model_path(self) -> Optional[Path]:
        m = self._model
        return m.path if m else None

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Load the model (when given), open the sinks, start the capture threads and workers."""
        if self._started_at is not None:
            raise RuntimeError("StreamManager.start() called twice")
        if self._model_path is not None and self._model is None:
            self._model = self._load(self._model_path, self._names)
        for st in self._streams.values():
            if st.cfg.sink:
                try:
                    Path(st.cfg.sink).parent.mkdir(parents=True, exist_ok=True)
                    st.sink = open(st.cfg.sink, "a", encoding="utf-8", buffering=1)  # line-buffered: a crash loses <= 1 line
                except OSError as e:
                    self._close_sinks()
                    raise UserInputError(f"stream {st.name}: cannot open sink {st.cfg.sink}: {e.strerror or e}") from None
        self._started_at = time.monotonic()
        self._started_wall = time.time()  # counters and histograms count from here (Prometheus' "created")
        self._cpu_mark = (time.monotonic(), self._cpu_seconds())
        for st in self._streams.values():
            st.thread = threading.Thread(target=self._capture_loop, args=(st,), name=f"capture-{st.name}", daemon=True)
            self._threads.append(st.thread)
        for i in range(self.workers):
            self._threads.append(threading.Thread(target=self._worker_loop, name=f"infer-{i}", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """Stop reading, let workers finish their frame, count queued frames as ``stopped``.

        Returns the final metrics; afterwards ``read == processed + dropped`` for every stream.
        """
        with self._lock:
            self._stopping = True
            self._have_frame.notify_all()
            for st in self._streams.values():
                st.space.notify_all()
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:  # a capture blocked in a network read; it counts nothing once _stopping is set
            log.warning("threads still running after stop(%.1f s): %s", timeout, ", ".join(stuck))
        with self._lock:
            for st in self._streams.values():
                st.dropped["stopped"] += len(st.queue)
                st.queue.clear()
                if st.state == "up":
                    st.state, st.reason = "down", "stopped"
        self._close_sinks()
        return self.metrics()

    def _close_sinks(self) -> None:
        for st in self._streams.values():
            with st.sink_lock:
                if st.sink:
                    st.sink.close()
                    st.sink = None

    def __enter__(self) -> "StreamManager":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------- capture

    def _set_state(self, st: _Stream, state: str, reason: Optional[str]) -> None:
        with self._lock:
            if self._stopping:
                return
            changed = (st.state, st.reason) != (state, reason)
            st.state, st.reason = state, reason
        if changed:
            (log.info if state == "up" else log.warning)("stream %s: %s%s", st.name, state, f" ({reason})" if reason else "")

    def _wait_for_space(self, st: _Stream) -> bool:
        """``policy: block``: wait before reading until the queue has room; False when stopping.

        Waiting *before* the read keeps every counted frame queued, processed or dropped.
        """
        with self._lock:
            while len(st.queue) >= max(1, st.cfg.queue) and not self._stopping:
                st.space.wait()
            return not self._stopping

    def _enqueue(self, st: _Stream, frame: _Frame) -> bool:
        """Count a read frame and queue it; False when stopping (the frame is not counted)."""
        with self._lock:
            if self._stopping:
                return False
            st.read += 1
            _mark(st.read_times, frame.t)
            if len(st.queue) >= max(1, st.cfg.queue):  # never true under policy block (see _wait_for_space)
                st.queue.popleft()  # latest-frame policy: the oldest waiting frame is worth least
                st.dropped["queue_full"] += 1
            st.queue.append(frame)
            self._have_frame.notify()
            return True

    def _pacing_interval(self, st: _Stream, cap: cv2.VideoCapture) -> float:
        """Seconds between reads: files play at their own fps (or ``fps_limit``); ``fps_limit <= 0`` = as fast as possible."""
        lim = st.cfg.fps_limit
        if lim is not None:
            return 0.0 if lim <= 0 else 1.0 / lim
        if st.kind != "file":
            return 0.0  # a live source paces itself
        fps = cap.get(cv2.CAP_PROP_FPS)
        return 1.0 / (fps if fps and 0 < fps < 1000 else DEFAULT_FILE_FPS)

    def _capture_loop(self, st: _Stream) -> None:
        """Thread body: an unexpected error marks the stream down and restarts it, never ends it silently."""
        while not self._stop.is_set():
            try:
                self._capture(st)
                return
            except Exception as e:  # noqa: BLE001 - a bug or an OpenCV surprise must not freeze the stream "up"
                log.exception("stream %s: capture failed", st.name)
                self._set_state(st, "down", f"capture failed: {type(e).__name__}: {str(e)[:200]}")
                self._stop.wait(st.cfg.retry_max_s)

    def _capture(self, st: _Stream) -> None:
        backoff = st.cfg.retry_min_s
        index = 0
        while not self._stop.is_set():
            cap, why = open_capture(st.cfg.source)
            if cap is None:
                self._set_state(st, "down", why)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, st.cfg.retry_max_s)
                continue
            with self._lock:
                st.opens += 1
            self._set_state(st, "up", None)
            interval = self._pacing_interval(st, cap)
            live_limit = interval if st.kind != "file" else 0.0
            file_interval = interval if st.kind == "file" else 0.0
            n = 0
            next_t = next_keep = time.monotonic()
            try:
                while not self._stop.is_set():
                    if file_interval:
                        now = time.monotonic()
                        if next_t > now and self._stop.wait(next_t - now):
                            break
                        # After a stall, restart the schedule rather than burst to catch up.
                        next_t = max(next_t + file_interval, time.monotonic() - file_interval)
                    if st.cfg.policy == "block" and not self._wait_for_space(st):
                        break
                    ok, img = cap.read()
                    if not ok or img is None:
                        break
                    n += 1
                    now = time.monotonic()
                    frame = _Frame(index, img, now, time.time())
                    index += 1
                    if live_limit and now < next_keep:
                        with self._lock:  # a camera faster than fps_limit: read (to stay current) and skip
                            if self._stopping:
                                break
                            st.read += 1
                            _mark(st.read_times, now)
                            st.dropped["fps_limit"] += 1
                        continue
                    if live_limit:  # a schedule, not a min gap: a 30 fps camera limited to 10 keeps 10, not 7.5
                        next_keep = max(next_keep + live_limit, now - live_limit)
                    if not self._enqueue(st, frame):
                        break
            except cv2.error as e:  # a corrupt stream: treat like a source that stopped
                self._set_state(st, "down", f"read error: {str(e).strip().splitlines()[-1][:200]}")
            finally:
                cap.release()
            if self._stop.is_set():
                break
            if st.kind == "file" and n > 0:
                if st.cfg.loop:
                    with self._lock:
                        st.loops += 1
                    backoff = st.cfg.retry_min_s
                    continue
                self._set_state(st, "ended", "end of file")
                return
            if n > 0:
                backoff = st.cfg.retry_min_s  # it worked for a while: retry soon
            self._set_state(st, "down", "no frames from source" if n == 0 else "source stopped delivering frames")
            self._stop.wait(backoff)
            backoff = min(backoff * 2, st.cfg.retry_max_s)

    # ---------------------------------------------------------------- inference

    def _take(self) -> Optional[tuple[_Stream, _Frame, Optional[_Model]]]:
        """The oldest queued frame of all streams (fair across streams), or None when stopping."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                best: Optional[_Stream] = None
                for st in self._streams.values():
                    if st.queue and (best is None or st.queue[0].t < best.queue[0].t):
                        best = st
                if best is not None:
                    frame = best.queue.popleft()
                    best.in_worker += 1
                    best.space.notify()
                    return best, frame, self._model  # the model snapshot this frame finishes on
                self._have_frame.wait()

    def _worker_loop(self) -> None:
        while True:
            item = self._take()
            if item is None:
                return
            st, frame, model = item
            age_ms = (time.monotonic() - frame.t) * 1e3
            if model is None:
                self._finish(st, "no_model")
                continue
            if st.cfg.max_age_ms is not None and age_ms > st.cfg.max_age_ms:
                self._finish(st, "stale")
                continue
            try:
                det, timing = model.detector.detect_array(frame.img, st.conf)
            except Exception as e:  # a broken model must not kill the worker; the stream keeps going
                self._finish(st, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                continue
            names = model.detector.names
            classes = Counter(names.get(k, str(k)) for k in det[:, 5].astype(int).tolist()) if len(det) else None
            self._finish(st, None, latency_ms=timing.total_ms, age_ms=age_ms, classes=classes)
            try:
                self._emit(st, frame, model, det, timing.total_ms, age_ms)
            except Exception as e:  # noqa: BLE001 - e.g. a full disk under the sink: count it, keep inferring
                with self._lock:
                    st.output_errors += 1
                log.warning("stream %s: output failed: %s", st.name, e)
            if self.harvester is not None and st.cfg.harvest:
                self.harvester.offer(st.name, frame.img, frame.wall, det)  # never blocks, never raises

    def _finish(self, st: _Stream, drop: Optional[str], error: Optional[str] = None, latency_ms: float = 0.0,
                age_ms: float = 0.0, classes: Optional[Counter] = None) -> None:
        with self._lock:
            st.in_worker -= 1
            if drop:
                st.dropped[drop] += 1
                if error:
                    st.errors += 1
                    st.last_error = error
            else:
                st.processed += 1
                _mark(st.proc_times, time.monotonic())
                st.latency.append(latency_ms)
                st.age.append(age_ms)
                st.hist.observe(latency_ms / 1e3)
                if classes:
                    st.classes.update(classes)
        if error:
            log.warning("stream %s: inference failed: %s", st.name, error)

    def _emit(self, st: _Stream, frame: _Frame, model: _Model, det: np.ndarray, latency_ms: float, age_ms: float
              ) -> None:
        want_pub = st.cfg.publish_detections and self.on_detections is not None
        if st.sink is None and not want_pub:
            return
        h, w = frame.img.shape[:2]
        payload = {"stream": st.name, "frame": frame.index, "ts": round(frame.wall, 3),
                   "model": model.path.name if model.path else None, "width": w, "height": h,
                   "age_ms": round(age_ms, 1), "latency_ms": round(latency_ms, 2),
                   "detections": model.detector.to_dicts(det)}
        if st.sink is not None:
            with st.sink_lock:
                if st.sink is not None:
                    st.sink.write(json.dumps(payload, separators=(",", ":")) + "\n")
        if want_pub:
            rate = st.cfg.detections_rate_hz
            now = time.monotonic()
            with self._lock:
                allowed = rate <= 0 or now - st.last_publish >= 1.0 / rate  # <= 0: every frame
                if allowed:
                    st.last_publish = now
                else:
                    st.suppressed += 1
            if allowed:
                try:
                    self.on_detections(st.name, payload)  # type: ignore[misc]
                    with self._lock:
                        st.published += 1
                except Exception as e:  # the publisher's problem must not stop inference
                    with self._lock:
                        st.publish_errors += 1
                    log.warning("stream %s: on_detections failed: %s", st.name, e)

    # ---------------------------------------------------------------- metrics

    @staticmethod
    def _cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def _process_metrics(self) -> dict[str, Any]:
        """CPU % of the whole process since the previous call (100 = one core), and RSS."""
        now, cpu = time.monotonic(), self._cpu_seconds()
        # Calls closer than 0.2 s apart repeat the last value: a tiny interval measures only noise.
        if self._cpu_mark is not None and now - self._cpu_mark[0] >= 0.2:
            self._cpu_pct = round(100.0 * (cpu - self._cpu_mark[1]) / (now - self._cpu_mark[0]), 1)
            self._cpu_mark = (now, cpu)
        pct = self._cpu_pct
        rss = None
        try:
            import psutil

            rss = round(psutil.Process().memory_info().rss / 2**20, 1)
        except Exception:  # psutil is a dependency, but metrics must never raise
            pass
        return {"cpu_percent": pct, "rss_mb": rss}

    def metrics(self) -> dict[str, Any]:
        """Per-stream counters, rates and percentiles, plus process CPU % and RSS (see module docstring)."""
        now = time.monotonic()
        since = self._started_at or now
        out: dict[str, Any] = {}
        with self._lock:
            for name, st in self._streams.items():
                dropped = {r: st.dropped.get(r, 0) for r in DROP_REASONS}
                out[name] = {
                    "state": st.state, "reason": st.reason, "source": st.cfg.source,
                    "frames_read": st.read, "frames_processed": st.processed,
                    "frames_dropped": sum(dropped.values()), "dropped_by_reason": dropped,
                    "in_flight": st.in_flight(),
                    "input_fps": _rate(st.read_times, now, since), "processed_fps": _rate(st.proc_times, now, since),
                    "frame_age_ms": _percentiles(st.age, (50, 95)),
                    "latency_ms": _percentiles(st.latency, (50, 95, 99)),
                    "latency_seconds": st.hist.to_dict(),
                    "detections_by_class": dict(sorted(st.classes.items())),
                    "opens": st.opens, "loops": st.loops, "errors": st.errors, "last_error": st.last_error,
                    "detections_published": st.published, "detections_suppressed": st.suppressed,
                    "publish_errors": st.publish_errors, "output_errors": st.output_errors,
                }
            model = self._model
            swaps = self._swaps
        res: dict[str, Any] = {"streams": out, "workers": self.workers, "threads": self.threads,
                               "model": str(model.path) if model and model.path else None,
                               "backend": getattr(model.session, "backend", None) if model else None, "swaps": swaps,
                               "uptime_s": round(now - since, 1) if self._started_at else 0.0,
                               "started_ts_ms": int(self._started_wall * 1000) if self._started_at else None}
        res.update(self._process_metrics())
        return res
