"""The device's model store: staged / active / previous, crash-safe at any instant.

Layout under ``state_dir``::

    models/<id>/        complete, verified package directories (manifest.json, model.onnx, ...)
                        plus ``.files.json`` (sha256 of every file); a directory only appears
                        here by an atomic rename from staging/, so it is never half-written
    staging/            work area (same filesystem, so renames are atomic); cleaned on open
    current.json        {"active": id|null, "previous": id|null}, replaced atomically
    versions.json       {name: {"version": v, "sha256": s}}: the highest version of each model
                        name ever activated here (rollback protection that survives deploys of
                        other names and restarts); only ever raised

``<id>`` is the first 20 hex digits of the sha256 of the package's exact ``manifest.json``
bytes (the manifest holds the model's sha256, so the id names the whole content).

Every state change is: write the new files, fsync them, rename, fsync the directory. A
``kill -9`` at any point leaves either the old or the new state, never a mix; on open the
active model is re-hashed and, if broken, the previous one is used instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prune_pack.agent.fsutil import atomic_write, fsync_dir, move_aside
from prune_pack.agent.manifest import sha256_file
from prune_pack.errors import ReasonedError

log = logging.getLogger("prune_pack.agent.store")

INDEX = ".files.json"
_ID_RE = re.compile(r"^[0-9a-f]{20}$")
KEEP_EXTRA = 3  # stored models kept besides active and previous (for `activate`)


class StoreError(ReasonedError):
    """A store operation that cannot be done; ``reason`` is a stable code for MQTT answers."""


@dataclass
class StoredModel:
    id: str
    dir: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def model_path(self) -> Path:
        return self.dir / "model.onnx"

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", ""))

    @property
    def version(self) -> int:
        v = self.manifest.get("version", 0)
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    @property
    def sha256(self) -> str:
        return str(self.manifest.get("sha256", ""))

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp32"))

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "version": self.version, "sha256": self.sha256,
                "precision": self.precision}


class ModelStore:
    """Models on disk with one active and one previous; all methods are crash-safe."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)
        self.models_dir = self.root / "models"
        self.staging_dir = self.root / "staging"
        self.current_path = self.root / "current.json"
        self.versions_path = self.root / "versions.json"
        self._versions: dict[str, dict[str, Any]] = {}
        self._active: Optional[str] = None
        self._previous: Optional[str] = None
        self.recovered: list[str] = []  # what open() had to repair, for the logs and status

    # ------------------------------------------------------------------ open / recover
    def open(self, trust: Optional[Callable[[Path], bool]] = None) -> "ModelStore":
        """Create the layout, clean leftovers of interrupted operations, and settle on a
        verified active model: the recorded one, else the previous one, else (when current.json
        is damaged or names broken models) the newest stored model that verifies. ``trust(dir)``
        (the daemon: the signature against its trusted keys) is checked besides the hashes."""
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.models_dir, self.staging_dir):
            if d.exists() and not d.is_dir() or d.is_symlink():
                self.recovered.append(f"{d.name} was not a folder; moved to {move_aside(d)}")
            d.mkdir(parents=True, exist_ok=True)
        for p in self.staging_dir.iterdir():  # interrupted deploys / profiles / removals
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            self.recovered.append(f"removed stale {p.name}")
        for p in self.root.glob(".current.json.*.tmp"):  # interrupted switch: old current.json wins
            p.unlink(missing_ok=True)
        def ok(mid: str) -> bool:
            return self.verify(mid) and (trust is None or trust(self.models_dir / mid))

        active, previous, damaged = self._read_current()
        if active and not ok(active):
            self.recovered.append(f"active {active} is broken")
            log.error("active model %s failed verification; falling back to the previous one", active)
            active, previous, damaged = ((previous, None, False) if previous and ok(previous) else (None, None, True))
        if previous and not ok(previous):
            self.recovered.append(f"previous {previous} is broken")
            previous = None
        if active is None and damaged:
            newest = next((m.id for m in reversed(self.list()) if ok(m.id)), None)
            if newest:
                self.recovered.append(f"serving {newest}, the newest stored model that verifies")
                log.error("no usable active model recorded; serving %s, the newest stored model that verifies", newest)
            active = newest
        if (active, previous) != self._read_current()[:2]:
            self._write_current(active, previous)
        self._active, self._previous = active, previous
        self._load_versions()
        for d in self.models_dir.iterdir():  # a removal that was interrupted half-way
            if d.name not in (active, previous) and not (d / INDEX).is_file():
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                self.recovered.append(f"removed incomplete {d.name}")
        self.gc()  # stored models of interrupted deploys do not pile up
        return self

    def _read_current(self) -> tuple[Optional[str], Optional[str], bool]:
        """(active, previous, damaged): damaged when current.json is unreadable or names a model
        that is not there (then open() falls back to the newest stored model that verifies)."""
        try:
            data = json.loads(self.current_path.read_text())
            a, p = data.get("active"), data.get("previous")
            ok = lambda x: x if isinstance(x, str) and _ID_RE.match(x) and (self.models_dir / x).is_dir() else None  # noqa: E731
            return ok(a), ok(p), a is not None and ok(a) is None
        except FileNotFoundError:
            return None, None, False
        except (OSError, ValueError, AttributeError, UnicodeDecodeError) as e:
            log.error("unreadable %s (%s)", self.current_path, e)
            return None, None, True

    def _load_versions(self) -> None:
        try:
            data = json.loads(self.versions_path.read_text())
            if not isinstance(data, dict) or not all(isinstance(v, dict) and isinstance(v.get("version"), int)
                                                     for v in data.values()):
                raise ValueError("expected {name: {version, sha256}}")
            self._versions = data
        except FileNotFoundError:
            self._versions = {}
        except (OSError, ValueError) as e:
            moved = move_aside(self.versions_path)
            self.recovered.append(f"unreadable versions.json ({e}) moved to {moved}; rebuilt from the stored models")
            self._versions = {}
        # Older state dirs (and a rebuilt file) learn from what is installed; never lowered.
        for mid in (self._active, self._previous):
            if mid:
                self.remember(self.get(mid).manifest)

    def highest(self, name: str) -> Optional[dict[str, Any]]:
        """The highest version of ``name`` ever activated here: ``{name, version, sha256}`` or None."""
        rec = self._versions.get(name)
        return {"name": name, **rec} if rec else None

    def remember(self, manifest: dict[str, Any]) -> None:
        """Raise the remembered version of the manifest's name (persisted before the switch)."""
        name, version = manifest.get("name"), manifest.get("version")
        if not isinstance(name, str) or not isinstance(version, int):
            return
        cur = self._versions.get(name)
        if cur is not None and cur["version"] >= version:
            return
        self._versions[name] = {"version": version, "sha256": manifest.get("sha256")}
        atomic_write(self.versions_path, json.dumps(self._versions, sort_keys=True).encode())

    def _write_current(self, active: Optional[str], previous: Optional[str]) -> None:
        atomic_write(self.current_path, json.dumps({"active": active, "previous": previous}).encode())

    # ------------------------------------------------------------------ queries
    def get(self, model_id: str) -> StoredModel:
        d = self.models_dir / model_id
        if not _ID_RE.match(model_id or "") or not (d / INDEX).is_file():
            raise StoreError("not_found", f"no stored model {model_id!r}")
        return StoredModel(model_id, d, json.loads((d / "manifest.json").read_text()))

    def find(self, ref: str) -> StoredModel:
        """A stored model by id, id prefix, or model sha256 (prefix of at least 8 hex digits)."""
        if len(ref) < 8:
            raise StoreError("not_found", f"model reference {ref!r} is too short (8+ hex digits)")
        hits = [m for m in self.list() if m.id.startswith(ref) or m.sha256.startswith(ref)]
        if len(hits) != 1:
            raise StoreError("not_found" if not hits else "ambiguous", f"{len(hits)} stored models match {ref!r}")
        return hits[0]

    @property
    def active(self) -> Optional[StoredModel]:
        return self.get(self._active) if self._active else None

    @property
    def previous(self) -> Optional[StoredModel]:
        return self.get(self._previous) if self._previous else None

    def list(self) -> list[StoredModel]:
        out = []
        for d in sorted(self.models_dir.iterdir(), key=lambda p: p.stat().st_mtime):
            if (d / INDEX).is_file():
                try:
                    out.append(self.get(d.name))
                except (OSError, ValueError):
                    continue
        return out

    def state_of(self, model_id: str) -> str:
        return "active" if model_id == self._active else "previous" if model_id == self._previous else "stored"

    def verify(self, model_id: str) -> bool:
        """Every file listed in the index exists with its recorded sha256, and the model
        matches the manifest's sha256."""
        d = self.models_dir / model_id
        try:
            index = json.loads((d / INDEX).read_text())
            for name, digest in index.items():
                if sha256_file(d / name) != digest:
                    return False
            manifest = json.loads((d / "manifest.json").read_text())
            return index.get("model.onnx") == manifest.get("sha256")
        except (OSError, ValueError, AttributeError):
            return False

    # ------------------------------------------------------------------ changes
    def new_staging(self, prefix: str) -> Path:
        p = self.staging_dir / f"{prefix}-{uuid.uuid4().hex[:12]}"
        p.mkdir(parents=True)
        return p

    def stage(self, package_dir: Path, crash_hook: Any = None) -> StoredModel:
        """Move a verified package directory into the store (idempotent for the same content).

        A directory inside ``staging/`` (where ``verify_package`` extracts when given
        ``staging_root=store.staging_dir``) is moved by rename; anything else is copied first.
        """
        src = Path(package_dir)
        manifest_bytes = (src / "manifest.json").read_bytes()
        model_id = hashlib.sha256(manifest_bytes).hexdigest()[:20]
        if (self.models_dir / model_id / INDEX).is_file() and self.verify(model_id):
            if src.resolve().parent == self.staging_dir.resolve():
                shutil.rmtree(src, ignore_errors=True)
            return self.get(model_id)
        if src.resolve().parent == self.staging_dir.resolve():
            tmp = src
        else:
            tmp = self.new_staging(f"stage-{model_id}")
            for f in sorted(src.iterdir()):
                if f.is_file() and f.name != INDEX:
                    shutil.copyfile(f, tmp / f.name)
        index = {}
        for f in sorted(tmp.iterdir()):
            if f.is_file() and f.name != INDEX:
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                index[f.name] = sha256_file(f)
                if crash_hook:
                    crash_hook("stage_files")
        if "model.onnx" not in index or "manifest.json" not in index:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError("incomplete_package", "manifest.json and model.onnx are required")
        if index["model.onnx"] != json.loads(manifest_bytes).get("sha256"):
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError("hash_mismatch", "model.onnx does not match the manifest's sha256")
        atomic_write(tmp / INDEX, json.dumps(index, sort_keys=True).encode())
        dest = self.models_dir / model_id
        if dest.exists():  # broken leftover with the same id
            self._remove_dir(dest)
        os.rename(tmp, dest)
        fsync_dir(self.models_dir)
        return self.get(model_id)

    def activate(self, model_id: str, crash_hook: Any = None) -> StoredModel:
        """Make a stored model active; the active one becomes previous. One atomic rename."""
        m = self.get(model_id)
        if not self.verify(model_id):
            raise StoreError("corrupt", f"stored model {model_id} fails its hash check")
        if model_id == self._active:
            return m
        previous = self._active
        self.remember(m.manifest)
        if crash_hook:
            crash_hook("before_switch")
        self._write_current(model_id, previous)
        self._active, self._previous = model_id, previous
        if crash_hook:
            crash_hook("after_switch")
        self.gc()
        return m

    def rollback(self) -> StoredModel:
        """Swap active and previous (a second rollback undoes the first)."""
        if not self._previous:
            raise StoreError("no_previous", "there is no previous model to roll back to")
        if not self.verify(self._previous):
            raise StoreError("corrupt", f"previous model {self._previous} fails its hash check")
        self._write_current(self._previous, self._active)
        self._active, self._previous = self._previous, self._active
        return self.get(self._active)

    def remove(self, model_id: str) -> None:
        if model_id in (self._active, self._previous):
            raise StoreError("in_use", f"model {model_id} is {self.state_of(model_id)}")
        d = self.models_dir / model_id
        if d.exists():
            self._remove_dir(d)

    def _remove_dir(self, d: Path) -> None:
        # Rename into staging first: a crash mid-rmtree leaves junk in staging/ (cleaned on
        # open), never a half-deleted directory under models/.
        trash = self.staging_dir / f"trash-{uuid.uuid4().hex[:12]}"
        os.rename(d, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def gc(self, keep_extra: int = KEEP_EXTRA) -> None:
        others = [m for m in self.list() if m.id not in (self._active, self._previous)]
        for m in others[: max(0, len(others) - keep_extra)]:  # oldest first
            self.remove(m.id)
