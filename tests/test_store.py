"""ModelStore: staged/active/previous, verification on open, and kill -9 at every step of a
switch (a real SIGKILL of a child process, then recovery in this one)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from test_mqtt_helpers import package

from prune_pack.agent.verifier import verify_package
from prune_pack.agent.store import ModelStore, StoreError


def staged(store: ModelStore, pkg, pub):
    vp = verify_package(pkg, [pub], staging_root=store.staging_dir)
    return store.stage(vp.dir)


@pytest.fixture
def pkgs(tmp_path):
    from test_mqtt_helpers import keys

    _, pub = keys(tmp_path)
    return pub, package(tmp_path, 1), package(tmp_path, 2), package(tmp_path, 3)


def test_activate_rollback_and_gc(tmp_path, pkgs):
    pub, v1, v2, v3 = pkgs
    s = ModelStore(tmp_path / "state").open()
    assert s.active is None and s.previous is None and s.list() == []
    with pytest.raises(StoreError, match="no_previous"):
        s.rollback()
    m1 = staged(s, v1, pub)
    assert s.active is None and s.state_of(m1.id) == "stored"  # staging does not activate
    s.activate(m1.id)
    m2 = staged(s, v2, pub)
    s.activate(m2.id)
    assert (s.active.version, s.previous.version) == (2, 1)
    assert list((tmp_path / "state" / "staging").iterdir()) == []  # verify_package's dirs were moved
    assert s.rollback().version == 1 and s.previous.version == 2
    with pytest.raises(StoreError, match="in_use"):
        s.remove(m1.id)
    # the state is on disk: a new instance sees the same
    s2 = ModelStore(tmp_path / "state").open()
    assert (s2.active.id, s2.previous.id) == (m1.id, m2.id)
    assert staged(s2, v1, pub).id == m1.id  # same content, same id, idempotent
    m3 = staged(s2, v3, pub)
    s2.gc(keep_extra=0)
    assert {m.id for m in s2.list()} == {m1.id, m2.id}  # m3 was neither active nor previous
    assert m3.id not in {m.id for m in s2.list()}


def test_open_falls_back_when_active_is_corrupt(tmp_path, pkgs):
    pub, v1, v2, _ = pkgs
    s = ModelStore(tmp_path / "state").open()
    a = staged(s, v1, pub)
    s.activate(a.id)
    b = staged(s, v2, pub)
    s.activate(b.id)
    with open(b.model_path, "r+b") as f:  # bit rot / a tampered file on disk
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    (tmp_path / "state" / "staging" / "stage-leftover").mkdir()
    s2 = ModelStore(tmp_path / "state").open()
    assert s2.active.id == a.id and s2.previous is None
    assert s2.verify(a.id) and not s2.verify(b.id)
    assert list((tmp_path / "state" / "staging").iterdir()) == []
    assert json.loads((tmp_path / "state" / "current.json").read_text()) == {"active": a.id, "previous": None}
    with pytest.raises(StoreError, match="corrupt"):
        s2.activate(b.id)


CHILD = textwrap.dedent("""
    import os, signal, sys
    from prune_pack.agent.verifier import verify_package
    from prune_pack.agent.store import ModelStore
    state, pkg, pub, point = sys.argv[1:5]
    def hook(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)
    s = ModelStore(state).open()
    vp = verify_package(pkg, [pub], staging_root=s.staging_dir)
    if point == "verified":
        hook(point)
    m = s.stage(vp.dir, crash_hook=hook)
    if point == "staged":
        hook(point)
    s.activate(m.id, crash_hook=hook)
    if point == "done":
        hook(point)
""")


@pytest.mark.parametrize("point", ["verified", "stage_files", "staged", "before_switch", "after_switch", "done"])
def test_kill9_during_switch_leaves_a_complete_verified_model(tmp_path, pkgs, point):
    pub, v1, v2, _ = pkgs
    s = ModelStore(tmp_path / "state").open()
    m1 = staged(s, v1, pub)
    s.activate(m1.id)
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "state"), str(v2), str(pub), point],
                       capture_output=True, timeout=60)
    assert r.returncode == -9, r.stderr.decode()[-500:]
    s2 = ModelStore(tmp_path / "state").open()
    assert s2.active is not None and s2.verify(s2.active.id)
    expect_new = point in ("after_switch", "done")
    assert s2.active.version == (2 if expect_new else 1)
    if expect_new:
        assert s2.previous.id == m1.id
    assert list((tmp_path / "state" / "staging").iterdir()) == []
    assert all(s2.verify(m.id) for m in s2.list())
