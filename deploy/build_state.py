"""The build's on-disk state (``OUT/.work/state.json``): typed, versioned, written atomically.

Everything a ``--resume`` needs: what was measured (the search's ``SearchState``, verification
included), validated, recovered and packaged. A state of another version is refused with a clear
message, never misread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from prune_pack.deploy.search import SearchState
from prune_pack.errors import UserInputError

STATE_VERSION = 2
# Test hook: the build interrupts itself (SIGINT, as Ctrl-C would) when it enters this phase, so
# that an interrupted-build test does not depend on how fast the host is.
STOP_AT_ENV = "PRUNE_PACK_STOP_AT_PHASE"


@dataclass
class BuildState:
    version: int = STATE_VERSION
    fingerprint: Optional[dict[str, Any]] = None  # model, data and settings: --resume must match
    model_sha256: Optional[str] = None
    phases_s: dict[str, float] = field(default_factory=dict)  # wall time per phase, summed over runs
    search: SearchState = field(default_factory=SearchState)  # measurements (final-<key>: verification)
    val: dict[str, dict[str, Any]] = field(default_factory=dict)  # validation results by key
    recovered: dict[str, dict[str, Any]] = field(default_factory=dict)  # tag -> {pt, method, epochs, seconds, ...}
    packages: dict[str, dict[str, Any]] = field(default_factory=dict)  # candidate key -> final package info

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["search"] = self.search.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: Path) -> "BuildState":
        if d.get("version") != STATE_VERSION:
            raise UserInputError(f"--resume: {where} was written by another prune-pack version (state version "
                                 f"{d.get('version')}, this one reads {STATE_VERSION}); start the build again without --resume")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["search"] = SearchState.from_json(d.get("search", {}))
        return cls(**kw)


class WorkArea:
    """The output folder's private work area (``OUT/.work``): candidates, state, and the atomic hand-over."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.out = out
        self.dir = out / ".work"
        self.state_path = self.dir / "state.json"
        if resume:
            if not self.state_path.is_file():
                raise UserInputError(f"--resume: no interrupted build in {out} (no {self.state_path})")
            self.state = BuildState.from_json(json.loads(self.state_path.read_text(encoding="utf-8")), self.state_path)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.state = BuildState()
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state.to_json(), indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.state_path)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (summed into the state) and save the state when it ends, however it ends."""
        t0 = time.monotonic()
        if os.environ.get(STOP_AT_ENV) == name:
            os.kill(os.getpid(), signal.SIGINT)
        try:
            yield
        finally:
            ph = self.state.phases_s
            ph[name] = round(ph.get(name, 0.0) + time.monotonic() - t0, 2)
            self.save()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
