"""agent.streams with real OpenCV video files and a real ONNX Runtime model (tests/data/tiny.onnx)."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest

from prune_pack.agent.backends import load_session
from prune_pack.agent.settings import InferenceSection, StreamSection
from prune_pack.agent.streams import StreamManager, plan_parallelism, session_factory_for, source_kind
from prune_pack.errors import UserInputError

TINY = Path(__file__).parent / "data" / "tiny.onnx"


def write_video(path: Path, frames: int, fps: float = 25.0, size: tuple[int, int] = (160, 120)) -> Path:
    """A real MJPG/AVI file written by OpenCV: a box moving over a grey background."""
    w, h = size
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for i in range(frames):
        img = np.full((h, w, 3), 90, np.uint8)
        cv2.rectangle(img, (5 + 2 * i % (w - 60), 20), (55 + 2 * i % (w - 60), 90), (40, 200, 250), -1)
        vw.write(img)
    vw.release()
    return path


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def check_invariant(m: dict, inf: InferenceSection, streams: list[StreamSection], running: bool) -> None:
    for s in streams:
        st = m["streams"][s.name]
        assert st["frames_dropped"] == sum(st["dropped_by_reason"].values())
        assert st["frames_read"] == st["frames_processed"] + st["frames_dropped"] + st["in_flight"], st
        if running:
            assert st["in_flight"] <= s.queue + m["workers"]
        else:
            assert st["in_flight"] == 0


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {"v40": write_video(d / "v40.avi", 40), "v12": write_video(d / "v12.avi", 12)}


def manager(streams: list[StreamSection], inf: InferenceSection | None = None, **kw: Any) -> StreamManager:
    inf = inf or InferenceSection(conf=0.01)
    return StreamManager(streams, inf, session_factory_for(inf, len(streams)), model_path=TINY, **kw)


def test_two_streams_block_policy_process_every_frame_and_end(videos, tmp_path):
    streams = [StreamSection(name=f"cam{i}", source=str(videos["v12"]), loop=False, fps_limit=0, policy="block",
                             queue=2, sink=str(tmp_path / f"cam{i}.jsonl")) for i in range(2)]
    inf = InferenceSection(conf=0.01, workers=2, threads=1)
    m = manager(streams, inf)
    m.start()
    wait_for(lambda: all(s["state"] == "ended" and s["in_flight"] == 0 for s in m.metrics()["streams"].values()))
    final = m.stop()
    check_invariant(final, inf, streams, running=False)
    for s in streams:
        st = final["streams"][s.name]
        assert (st["state"], st["reason"]) == ("ended", "end of file")
        assert st["frames_read"] == st["frames_processed"] == 12 and st["frames_dropped"] == 0
        lines = [json.loads(x) for x in Path(s.sink).read_text().splitlines()]
        assert sorted(x["frame"] for x in lines) == list(range(12))  # one line per processed frame
        assert all(x["stream"] == s.name and x["model"] == "tiny.onnx" and (x["width"], x["height"]) == (160, 120)
                   for x in lines)
        assert st["latency_ms"]["p50"] > 0 and st["frame_age_ms"]["p95"] >= st["frame_age_ms"]["p50"]
    assert final["rss_mb"] > 0 and final["workers"] == 2


def test_four_streams_latest_frame_metrics_add_up(videos):
    streams = [StreamSection(name=f"s{i}", source=str(videos["v40"]), fps_limit=200, loop=True) for i in range(4)]
    inf = InferenceSection(conf=0.01, workers=2, threads=1)
    m = manager(streams, inf)
    m.start()
    try:
        wait_for(lambda: all(s["frames_processed"] >= 5 for s in m.metrics()["streams"].values()))
        for _ in range(5):  # while running, every read frame is processed, dropped or in flight
            check_invariant(m.metrics(), inf, streams, running=True)
            time.sleep(0.05)
        wait_for(lambda: all(s["loops"] >= 1 for s in m.metrics()["streams"].values()))  # a file loops at its end
    finally:
        final = m.stop()
    check_invariant(final, inf, streams, running=False)
    for s in final["streams"].values():
        assert s["frames_processed"] > 0 and s["input_fps"] > 0 and s["processed_fps"] > 0
        assert s["latency_ms"]["p99"] >= s["latency_ms"]["p50"]
        assert set(s["dropped_by_reason"]) >= {"queue_full", "stale", "error", "stopped"}
    assert final["cpu_percent"] is not None and final["cpu_percent"] >= 0


def test_missing_source_is_down_retried_and_recovers(videos, tmp_path):
    late = tmp_path / "late.avi"
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video at all" * 100)
    streams = [StreamSection(name="ok", source=str(videos["v40"]), fps_limit=100),
               StreamSection(name="late", source=str(late), fps_limit=100, retry_min_s=0.05, retry_max_s=0.2),
               StreamSection(name="bad", source=str(bad), retry_min_s=0.05, retry_max_s=0.1)]
    inf = InferenceSection(conf=0.01)
    m = manager(streams, inf)
    m.start()
    try:
        wait_for(lambda: m.metrics()["streams"]["ok"]["frames_processed"] >= 3)
        st = m.metrics()["streams"]
        assert st["late"]["state"] == "down" and st["late"]["reason"].startswith("file not found")
        assert st["bad"]["state"] == "down" and st["bad"]["frames_read"] == 0
        assert "cannot open" in st["bad"]["reason"] or "no frames" in st["bad"]["reason"]
        write_video(tmp_path / "tmp.avi", 20).rename(late)  # the source appears: the next retry opens it
        wait_for(lambda: m.metrics()["streams"]["late"]["frames_processed"] >= 3)
        st = m.metrics()["streams"]
        assert st["late"]["state"] == "up" and st["late"]["reason"] is None
        assert st["ok"]["state"] == "up"  # the other streams never noticed
    finally:
        final = m.stop()
    check_invariant(final, inf, streams, running=False)


def test_file_plays_at_native_fps_by_default(videos):
    s = StreamSection(name="paced", source=str(videos["v12"]), loop=False)  # 12 frames at 25 fps
    m = manager([s])
    t0 = time.monotonic()
    m.start()
    wait_for(lambda: m.metrics()["streams"]["paced"]["state"] == "ended")
    elapsed = time.monotonic() - t0
    final = m.stop()
    assert elapsed >= 11 / 25 * 0.9  # a lower bound only: pacing can make reading slower, never faster
    assert final["streams"]["paced"]["frames_read"] == 12


def test_detections_callback_is_rate_limited(videos):
    got: list[tuple[str, dict]] = []
    lock = threading.Lock()

    def on_det(stream: str, payload: dict) -> None:
        with lock:
            got.append((stream, payload))

    streams = [StreamSection(name="pub", source=str(videos["v40"]), fps_limit=100, publish_detections=True,
                             detections_rate_hz=4.0),
               StreamSection(name="quiet", source=str(videos["v40"]), fps_limit=100)]
    m = manager(streams, on_detections=on_det)
    t0 = time.monotonic()
    m.start()
    try:
        wait_for(lambda: m.metrics()["streams"]["pub"]["detections_published"] >= 3)
    finally:
        final = m.stop()
    elapsed = time.monotonic() - t0
    st = final["streams"]["pub"]
    assert st["detections_published"] == len(got) >= 3 and st["detections_suppressed"] > 0
    assert st["detections_published"] + st["detections_suppressed"] == st["frames_processed"]
    assert {s for s, _ in got} == {"pub"}  # publish_detections is per stream
    p = got[0][1]
    assert isinstance(p["detections"], list) and {"frame", "ts", "model", "latency_ms", "age_ms"} <= set(p)
    # The limiter keeps >= 1/rate s between messages, so over the whole run (an upper bound, not a timing):
    assert len(got) <= 4.0 * elapsed + 1


def test_stale_frames_are_dropped_by_reason(videos):
    s = StreamSection(name="old", source=str(videos["v40"]), fps_limit=100, max_age_ms=0.0)
    inf = InferenceSection(conf=0.01)
    m = manager([s], inf)
    m.start()
    try:
        wait_for(lambda: m.metrics()["streams"]["old"]["dropped_by_reason"]["stale"] >= 5)
    finally:
        final = m.stop()
    st = final["streams"]["old"]
    assert st["frames_processed"] == 0 and st["dropped_by_reason"]["stale"] >= 5
    check_invariant(final, inf, [s], running=False)


class GatedSession:
    """A real ORT session whose ``run`` can be held at a gate, to catch a frame in flight."""

    def __init__(self, path: Path) -> None:
        self._s = load_session(path, threads=1)
        self.path = path
        self.input_shape, self.input_dtype = self._s.input_shape, self._s.input_dtype
        self.entered = threading.Event()
        self.release = threading.Event()
        self.gated = True

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.gated:
            self.gated = False
            self.entered.set()
            assert self.release.wait(20)
        return self._s.run(x)


def test_swap_mid_run_frames_in_flight_finish_on_old_model(videos, tmp_path):
    old_path = tmp_path / "old.onnx"
    new_path = tmp_path / "new.onnx"
    shutil.copy(TINY, old_path)
    shutil.copy(TINY, new_path)
    sink = tmp_path / "swap.jsonl"
    s = StreamSection(name="cam", source=str(videos["v40"]), fps_limit=100, sink=str(sink))
    inf = InferenceSection(conf=0.01, workers=1, threads=1)
    gated = GatedSession(old_path)
    m = StreamManager([s], inf, session_factory_for(inf, 1))
    m.swap(gated)  # the Session form of swap: the daemon may hand over an already-loaded session
    m.start()
    try:
        assert gated.entered.wait(20)  # a frame is inside the old model's run()
        with pytest.raises(UserInputError):
            m.swap(tmp_path / "missing.onnx")  # a failed load leaves the old model active
        info = m.swap(new_path, {0: "a", 1: "b", 2: "c"})
        assert info["model"] == str(new_path) and info["previous"] == str(old_path)
        gated.release.set()
        wait_for(lambda: m.metrics()["streams"]["cam"]["frames_processed"] >= 5)
        assert m.metrics()["streams"]["cam"]["state"] == "up" and m.metrics()["model"] == str(new_path)
    finally:
        gated.release.set()
        final = m.stop()
    lines = [json.loads(x) for x in sink.read_text().splitlines()]
    assert lines[0]["model"] == "old.onnx"  # the frame in flight during the swap finished on the old model
    assert all(x["model"] == "new.onnx" for x in lines[1:]) and len(lines) == final["streams"]["cam"]["frames_processed"]
    assert {d["name"] for x in lines[1:] for d in x["detections"]} <= {"a", "b", "c"}  # the new names
    assert final["swaps"] == 2 and final["streams"]["cam"]["opens"] == 1  # the stream was never reopened
    check_invariant(final, inf, [s], running=False)


def test_frames_without_a_model_are_dropped_as_no_model(videos):
    s = StreamSection(name="idle", source=str(videos["v40"]), fps_limit=100)
    inf = InferenceSection(workers=1, threads=1)
    m = StreamManager([s], inf, session_factory_for(inf, 1))  # no model yet: the daemon swaps one in later
    m.start()
    try:
        wait_for(lambda: m.metrics()["streams"]["idle"]["dropped_by_reason"]["no_model"] >= 3)
        m.swap(TINY)
        wait_for(lambda: m.metrics()["streams"]["idle"]["frames_processed"] >= 3)
    finally:
        final = m.stop()
    check_invariant(final, inf, [s], running=False)


def test_plan_parallelism_uses_cores_without_oversubscribing():
    assert plan_parallelism(InferenceSection(), 1, cores=2) == (2, 1)  # measured: see bench/results/streams.md
    assert plan_parallelism(InferenceSection(), 2, cores=2) == (2, 1)
    assert plan_parallelism(InferenceSection(), 4, cores=2) == (2, 1)
    assert plan_parallelism(InferenceSection(), 1, cores=1) == (1, 1)
    assert plan_parallelism(InferenceSection(), 1, cores=8) == (2, 4)
    assert plan_parallelism(InferenceSection(), 4, cores=8) == (4, 2)
    assert plan_parallelism(InferenceSection(), 16, cores=8) == (8, 1)
    assert plan_parallelism(InferenceSection(workers=3), 4, cores=8) == (3, 2)
    assert plan_parallelism(InferenceSection(threads=4), 4, cores=8) == (2, 4)
    assert plan_parallelism(InferenceSection(workers=1, threads=3), 4, cores=2) == (1, 3)  # explicit wins
    for n in (1, 2, 3, 8):
        for cores in (1, 2, 4, 16):
            w, t = plan_parallelism(InferenceSection(), n, cores=cores)
            assert w * t <= cores and w >= 1 and t >= 1


def test_source_kinds():
    assert source_kind("0") == "device" and source_kind("/dev/video2") == "device"
    assert source_kind("rtsp://cam/stream") == "url" and source_kind("http://x/y.mjpg") == "url"
    assert source_kind("/data/v.mp4") == "file"


def test_duplicate_stream_names_are_rejected():
    inf = InferenceSection()
    with pytest.raises(UserInputError):
        StreamManager([StreamSection(name="a", source="x"), StreamSection(name="a", source="y")], inf,
                      session_factory_for(inf, 2))


def test_unwritable_sink_is_a_one_line_error(videos, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    s = StreamSection(name="a", source=str(videos["v12"]), sink=str(blocker / "sub" / "a.jsonl"))
    m = manager([s])
    with pytest.raises(UserInputError, match="cannot open sink"):
        m.start()


def test_streams_run_on_openvino(videos):
    from prune_pack.agent.backends import available_backends

    if "openvino" not in available_backends():
        pytest.skip("openvino is not installed")
    s = StreamSection(name="ov", source=str(videos["v12"]), loop=False, fps_limit=0, policy="block")
    inf = InferenceSection(backend="openvino", conf=0.01, workers=2, threads=1)
    m = StreamManager([s], inf, session_factory_for(inf, 1), model_path=TINY)
    m.start()
    wait_for(lambda: m.metrics()["streams"]["ov"]["state"] == "ended" and m.metrics()["streams"]["ov"]["in_flight"] == 0)
    final = m.stop()
    assert final["streams"]["ov"]["frames_processed"] == 12 and final["streams"]["ov"]["errors"] == 0
    assert final["backend"] == "openvino"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def _serve(directory: Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_Quiet, directory=str(directory)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_url_source_that_stops_is_down_and_recovers(videos):
    """A real HTTP source on 127.0.0.1: the server goes away (down, reason), comes back (up again)."""
    srv = _serve(videos["v40"].parent)
    port = srv.server_address[1]
    s = StreamSection(name="net", source=f"http://127.0.0.1:{port}/v40.avi", fps_limit=200, retry_min_s=0.05,
                      retry_max_s=0.2)
    inf = InferenceSection(conf=0.01)
    m = manager([s], inf)
    m.start()
    try:
        wait_for(lambda: m.metrics()["streams"]["net"]["frames_processed"] >= 3)
        srv.shutdown()
        srv.server_close()
        wait_for(lambda: m.metrics()["streams"]["net"]["state"] == "down")
        st = m.metrics()["streams"]["net"]
        assert st["reason"].startswith(("cannot open", "source stopped", "no frames")), st["reason"]
        before = st["frames_processed"]
        srv = _serve(videos["v40"].parent, port)  # the camera is back on the same address
        wait_for(lambda: m.metrics()["streams"]["net"]["frames_processed"] > before + 3)
        st = m.metrics()["streams"]["net"]
        # Reopened by the retry (each successful open sets the state up), never "looped": a URL's end
        # is a source that stopped, so it may already be down again once this short file has played.
        assert st["opens"] >= 2 and st["loops"] == 0 and st["state"] in ("up", "down")
    finally:
        final = m.stop()
        srv.shutdown()
        srv.server_close()
    check_invariant(final, inf, [s], running=False)


def test_live_source_fps_limit_drops_are_counted(videos):
    """A URL delivers frames as fast as it can; fps_limit keeps a schedule and counts the rest."""
    srv = _serve(videos["v40"].parent)
    s = StreamSection(name="live", source=f"http://127.0.0.1:{srv.server_address[1]}/v40.avi", fps_limit=5.0,
                      retry_min_s=5.0)
    inf = InferenceSection(conf=0.01)
    m = manager([s], inf)
    t0 = time.monotonic()
    m.start()
    try:
        wait_for(lambda: m.metrics()["streams"]["live"]["frames_read"] >= 40)
    finally:
        final = m.stop()
        srv.shutdown()
        srv.server_close()
    elapsed = time.monotonic() - t0
    st = final["streams"]["live"]
    kept = st["frames_read"] - st["dropped_by_reason"]["fps_limit"]
    assert st["dropped_by_reason"]["fps_limit"] > 0 and 1 <= kept <= 5.0 * elapsed + 1
    check_invariant(final, inf, [s], running=False)
