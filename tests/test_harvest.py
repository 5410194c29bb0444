"""agent.harvest on the device: quotas, near-duplicates on real video, the free-disk floor, a
read-only or full disk (paused, never a crash), restarts, and the stream hook."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from prune_pack.agent.harvest import Harvester, list_frames
from prune_pack.agent.settings import HarvestSection, InferenceSection, StreamSection

TINY = Path(__file__).resolve().parent / "data" / "tiny.onnx"


def cfg(**kw) -> HarvestSection:
    return HarvestSection(**{"interval_s": 0.0, "min_free_mb": 0.0, "retry_s": 0.05, **kw})


def noise(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def det(*confs: float) -> np.ndarray:
    return np.array([[0, 0, 10, 10, c, 0] for c in confs], np.float32).reshape(-1, 6)


def feed(h: Harvester, images, stream: str = "cam", dets=None) -> list[str]:
    out = []
    for i, img in enumerate(images):
        out.append(h.offer(stream, img, 1.7e9 + i, dets[i] if dets else det()))
        assert h.wait_idle(10)
    return out


def test_count_quota_evicts_least_useful_and_restart_keeps_pool(tmp_path):
    h = Harvester(cfg(max_frames=4), tmp_path / "pool")
    h.start()
    # usefulness = 1 - mean confidence (0 without detections): frame 1 (0.3) is the most useful
    dets = [det(0.9), det(0.3), det(0.9), det(), det(0.8), det(0.95), det()]
    assert feed(h, [noise(i) for i in range(7)], dets=dets) == ["queued"] * 7
    st = h.status()
    # frame 4 (0.2) evicts frame 3 (0.0); frames 5 (0.05) and 6 (0.0) are less useful than any kept one
    assert (st["frames"], st["kept"], st["evicted"], st["rejected_low_score"]) == (4, 5, 1, 2), st
    assert st["state"] == "active" and st["kept_uncertain"] == 1
    names = sorted(p.name for p in (tmp_path / "pool").glob("*.jpg"))
    assert names == [f"cam_170000000{i}000.jpg" for i in (0, 1, 2, 4)]
    side = json.loads((tmp_path / "pool" / "cam_1700000001000.json").read_text())
    assert side["why"] == "uncertain" and side["stream"] == "cam" and side["score"] == 0.7
    assert side["time"].startswith("2023-11-14T22:13:21") and side["jpeg_bytes"] > 0
    h.stop()
    # a torn write (JPEG without sidecar) and a temp file are cleaned; the 4 frames come back
    (tmp_path / "pool" / "cam_1700000099000.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "pool" / ".cam_1.jpg.tmp").write_bytes(b"x")
    h2 = Harvester(cfg(max_frames=4), tmp_path / "pool")
    h2.start()
    assert h2.status()["frames"] == 4
    assert sorted(p.name for p in (tmp_path / "pool").iterdir() if p.suffix == ".jpg") == names
    feed(h2, [noise(1)])  # dedup against the rebuilt pool
    assert h2.status()["skipped_duplicate"] == 1 and h2.status()["frames"] == 4
    h2.stop()
    assert [p.name for p in list_frames(tmp_path / "pool")] == names


def test_mb_quota(tmp_path):
    h = Harvester(cfg(max_mb=0.1, jpeg_quality=95), tmp_path / "pool")
    h.start()
    feed(h, [noise(i, 96) for i in range(12)])  # noise JPEGs of ~20 KB each
    total = sum(p.stat().st_size for p in (tmp_path / "pool").iterdir())
    st = h.status()
    assert total <= 0.1 * 1024 * 1024 and st["evicted"] > 0 and 2 <= st["frames"] < 12
    h.stop()


def _video(path: Path, frames: list[np.ndarray]) -> str:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, frames[0].shape[1::-1])
    for f in frames:
        vw.write(f)
    vw.release()
    return str(path)


def _scene(i: int, moving: bool) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = np.full((120, 160, 3), 90, np.uint8)
    cv2.rectangle(img, (10, 10), (60, 50), (200, 180, 40), -1)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)  # sensor noise
    if moving:
        cv2.circle(img, ((13 * i) % 150 + 5, 90), 12, (20, 30, 40), -1)  # a dark object: gray thumbnails see luminance
    return img


def run_streams(tmp_path: Path, h: Harvester, videos: dict[str, str], until) -> dict:
    from prune_pack.agent.streams import StreamManager, session_factory_for

    inf = InferenceSection(threads=1, workers=1)
    streams = [StreamSection(name=n, source=v, loop=False, fps_limit=0, policy="block", harvest=True) for n, v in videos.items()]
    sm = StreamManager(streams, inf, session_factory_for(inf, 1), model_path=TINY, harvester=h)
    sm.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not until(sm.metrics()["streams"]):
        time.sleep(0.05)
    m = sm.stop()
    h.wait_idle()
    return m


def test_dedup_on_real_video_static_keeps_one_changing_keeps_more(tmp_path):
    vids = {"static": _video(tmp_path / "s.avi", [_scene(i, False) for i in range(30)]),
            "moving": _video(tmp_path / "m.avi", [_scene(i, True) for i in range(30)])}
    h = Harvester(cfg(queue=64), tmp_path / "pool")  # room for every frame: none dropped as queue_full
    h.start()
    m = run_streams(tmp_path, h, vids, lambda s: all(v["state"] == "ended" and v["in_flight"] == 0 for v in s.values()))
    assert m["streams"]["static"]["frames_processed"] == 30
    kept = {n: len(list((tmp_path / "pool").glob(f"{n}_*.jpg"))) for n in vids}
    assert kept["static"] == 1, kept
    assert kept["moving"] >= 5, kept
    assert h.status()["skipped_duplicate"] >= 29 and h.status()["dropped_queue_full"] == 0
    h.stop()


def test_free_disk_floor_pauses_with_reason(tmp_path):
    free_mb = __import__("shutil").disk_usage(tmp_path).free / 2**20
    h = Harvester(cfg(min_free_mb=free_mb + 10_000), tmp_path / "pool")
    h.start()
    assert feed(h, [noise(1)]) == ["queued"]
    st = h.status()
    assert st["state"] == "paused" and "under the floor" in st["reason"] and st["frames"] == 0
    assert st["skipped_floor"] == 1 and not list((tmp_path / "pool").glob("*.jpg"))
    h.cfg.min_free_mb = 0.0  # space came back: the next frame after retry_s resumes
    time.sleep(0.1)
    feed(h, [noise(2)])
    assert h.status()["state"] == "active" and h.status()["frames"] == 1
    h.stop()


def _mount_tmpfs(path: Path, opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_read_only_pool_is_paused_not_a_crash(tmp_path):
    pool = tmp_path / "pool"
    if os.geteuid() != 0:
        pool.mkdir()
        pool.chmod(0o555)
        mounted = False
    elif _mount_tmpfs(pool, "ro,size=1m"):
        mounted = True
    else:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    try:
        h = Harvester(cfg(retry_s=30), pool)
        h.start()  # opening a read-only pool works (nothing to clean)
        assert feed(h, [noise(1)]) == ["queued"]
        st = h.status()
        assert st["state"] == "paused" and st["reason"] in ("read-only file system", "permission denied"), st
        assert feed(h, [noise(2)]) == ["paused"]  # within retry_s: not even sampled
        h.stop()
    finally:
        if mounted:
            subprocess.run(["umount", str(pool)], check=True)


def test_full_disk_is_paused_not_a_crash(tmp_path):
    pool = tmp_path / "pool"
    if os.geteuid() != 0 or not _mount_tmpfs(pool, "size=64k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        h = Harvester(cfg(max_mb=100), pool)
        h.start()
        feed(h, [noise(i, 96) for i in range(8)])  # ~20 KB each: the third or fourth does not fit
        st = h.status()
        assert st["state"] == "paused" and st["reason"] == "disk full" and 1 <= st["frames"] <= 4, st
        assert not [p for p in pool.iterdir() if p.name.startswith(".")]  # no temp file left behind
        h.stop()
        h2 = Harvester(cfg(), pool)
        h2.start()
        assert h2.status()["frames"] == st["frames"]  # every kept frame is whole
        h2.stop()
    finally:
        subprocess.run(["umount", str(pool)], check=True)


def test_full_queue_drops_and_counts_never_blocks(tmp_path):
    h = Harvester(cfg(queue=1), tmp_path / "pool")  # writer not started: nothing drains the queue
    h.pool.open()
    got = [h.offer("cam", noise(i), 1.7e9 + i, det()) for i in range(5)]
    assert got == ["queued"] + ["queue_full"] * 4 and h.status()["dropped_queue_full"] == 4


def test_list_frames_accepts_a_folder_copied_by_hand(tmp_path):
    d = tmp_path / "frames"
    (d / "sub").mkdir(parents=True)
    cv2.imwrite(str(d / "a.jpg"), noise(1))
    cv2.imwrite(str(d / "sub" / "b.PNG"), noise(2))
    (d / "c.jpg.part").write_bytes(b"partial")
    (d / ".hidden.jpg").write_bytes(b"x")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("x")
    assert [p.relative_to(d).as_posix() for p in list_frames(d)] == ["a.jpg", "sub/b.PNG"]
    from prune_pack.errors import UserInputError

    with pytest.raises(UserInputError, match="not found"):
        list_frames(tmp_path / "nope")


def test_pull_pacing_bounds_the_rate(tmp_path):
    """frames-read answers are paced: N chunks never go out faster than pull_kbps allows (a lower
    bound that holds on any machine: sleeping never ends early)."""
    h = Harvester(cfg(pull_kbps=200), tmp_path / "pool")
    t0 = time.monotonic()
    for _ in range(4):
        h.pace(20 * 1024)  # 0.1 s of budget each
    assert time.monotonic() - t0 >= 0.3
