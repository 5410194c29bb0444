"""prune-pack: make YOLOv8 detectors fit an industrial PC's CPU, and keep them honest there.

Folders map to imports: ``agent/`` -> ``prune_pack.agent`` (device side, torch-free),
``pruning/`` -> ``prune_pack.pruning`` and ``deploy/`` -> ``prune_pack.deploy`` (host side).
"""

__version__ = "0.1.0"
