"""The device side of ``prune-pack frames pull``: the ``frames-list`` and ``frames-read`` commands
over the harvested pool (agent.harvest), and the daemon's harvester set-up.

``frames-read`` answers one chunk (at most ``harvest.chunk_kb``) with its sha256; answers are
paced to ``harvest.pull_kbps`` on average, on the slow lane, one chunk per request (the host
asks for the next only after it checked this one), so a pull never starves telemetry (sent by
the working loop) or the fast lane (ping, status). Both commands read only the pool; they exist
even when no stream harvests, so a pool kept from earlier can still be pulled.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from typing import Any, Optional

from prune_pack.agent.commands import SLOW, Arg, CommandError, command
from prune_pack.agent.harvest import FramesError, Harvester, pool_dir

log = logging.getLogger("prune_pack.agent.frames")

LIST_MAX = 1000  # frames per frames-list answer (~250 bytes each)
# Fault injection for the pull tests: flip one byte of the next N chunks after hashing them.
CORRUPT_ENV = "PRUNE_PACK_CORRUPT_CHUNKS"
_corrupted = 0


def start_harvester(daemon: Any) -> Harvester:
    """The daemon's harvester over its pool: started (index rebuilt, writer running); state
    ``off`` in telemetry when no stream has ``harvest: true``."""
    cfg = daemon.harvest_cfg

    def model_info() -> Optional[dict]:
        m = daemon.store.active
        return {k: v for k, v in m.summary().items() if k in ("name", "version", "sha256", "id")} if m else None

    h = Harvester(cfg, pool_dir(cfg, daemon.state_dir), model_info=model_info)
    h.start(enabled=any(s.harvest for s in daemon.stream_cfgs))
    return h


def _harvester(daemon: Any) -> Harvester:
    h = getattr(daemon, "harvester", None)
    if h is None:
        raise CommandError("no_pool", "the agent has no harvest pool (not started)")
    return h


@command("frames-list", SLOW, args={"since_ts_ms": Arg("integer", minimum=0),
                                    "after": Arg("string", max_length=128),
                                    "limit": Arg("integer", minimum=0, maximum=LIST_MAX)})
def frames_list(daemon: Any, args: dict) -> dict:
    """Kept frames, oldest first (``after``: the last name of the previous page), with the
    sidecar of each and the pool's state; ``limit: 0`` returns the state only."""
    h = _harvester(daemon)
    rows, more = h.pool.listing(args.get("since_ts_ms", 0), args.get("after"), args.get("limit", 500))
    return {"frames": rows, "more": more, "pool": h.status(), "chunk_kb": h.cfg.chunk_kb}


@command("frames-read", SLOW, args={"name": Arg("string", required=True, max_length=128),
                                    "offset": Arg("integer", minimum=0, maximum=2**40),
                                    "length": Arg("integer", minimum=1, maximum=16 * 1024 * 1024)})
def frames_read(daemon: Any, args: dict) -> dict:
    """One chunk of a kept frame: ``data_b64`` and its ``sha256``, the file's ``size``, ``eof``."""
    global _corrupted
    h = _harvester(daemon)
    offset = args.get("offset", 0)
    length = min(args.get("length", h.cfg.chunk_kb * 1024), h.cfg.chunk_kb * 1024)
    try:
        data, size = h.pool.read(args["name"], offset, length)
    except FramesError as e:
        raise CommandError(e.reason, e.detail) from None
    digest = hashlib.sha256(data).hexdigest()
    if data and _corrupted < int(os.environ.get(CORRUPT_ENV, "0") or 0):
        _corrupted += 1
        data = bytes([data[0] ^ 0xFF]) + data[1:]
        log.error("fault injection: corrupted a chunk of %s at %d", args["name"], offset)
    h.pace(len(data))
    return {"name": args["name"], "offset": offset, "length": len(data), "size": size,
            "eof": offset + len(data) >= size, "sha256": digest, "data_b64": base64.b64encode(data).decode("ascii")}
