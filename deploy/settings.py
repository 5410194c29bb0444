"""Typed configuration sections of the host side (validated by ``prune_pack.config``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from prune_pack.errors import UserInputError


@dataclass(frozen=True)
class Target:
    """A latency target: milliseconds, or (``relative``) a fraction of the unpruned model's latency
    as measured on the device (``0.7x``: 30 % faster), which means the same on a fast and a slow host."""

    value: float
    relative: bool = False

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value:g} ms"


def parse_target(text: object) -> Target:
    """``40`` / ``40ms`` -> 40 ms; ``0.7x`` -> 0.7 of the unpruned latency (0 < x < 1)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(x|ms)?\s*", str(text))
    if not m:
        raise UserInputError(f"target {text!r}: expected milliseconds (40) or a fraction of the unpruned latency (0.7x)")
    v, unit = float(m.group(1)), m.group(2)
    if unit == "x":
        if not 0 < v < 1:
            raise UserInputError(f"target {text}: a relative target is a fraction of the unpruned latency, between 0 and 1")
        return Target(v, relative=True)
    if not v > 0:
        raise UserInputError(f"target {text}: expected a positive number of milliseconds")
    return Target(v)


@dataclass
class PruneSection:
    criterion: str = "auto"  # l1, l2, bn_scale, taylor, act_var, lsq, or auto (the measured default: lsq with lsq compensation)
    max_layer_ratio: float = 0.75  # no layer loses more than this share of its channels
    round_to: int = 16  # prunable widths are multiples of this (ORT's AVX-512 blocks); small layers are kept whole
    calib_images: int = 128  # train images for data-aware criteria, least squares and BN statistics
    # How consumers make up for removed channels: least-squares refit of the kept weights and bias
    # (measured best), the removed channels' mean activation folded into the bias, or nothing.
    compensation: Literal["lsq", "mean", "none"] = "lsq"
    allocation: Literal["uniform", "global", "sensitivity"] = "sensitivity"
    # Re-estimate BatchNorm statistics on the calibration images after surgery; auto: with >= 64 images.
    recalibrate_bn: bool | Literal["auto"] = "auto"


@dataclass
class FinetuneSection:
    method: Literal["auto", "labels", "distill"] = "auto"  # auto: distill when the classes are the teacher's
    epochs: int = 10  # passes over the train split (unlabeled frames change what is seen, not how long)
    lr0: Optional[float] = None  # None: the method's default (labels: SGD 0.002, ~1/10 of training; distill: AdamW 3e-4)
    batch: Optional[int] = None  # None: the method's default (labels 16; distill 8 on the CPU, 32 on CUDA)
    workers: int = 2  # dataloader workers (parallel image loading; feeds a GPU)
    train_device: str = "auto"  # auto (CUDA when torch sees it, else cpu) | cpu | cuda | cuda:N
    distill: bool = False  # method labels: add Ultralytics' feature distillation (measured: no gain on short CPU budgets)
    distill_weight: float = 1.0
    patience: int = 0  # 0 = no early stopping


@dataclass
class ExportSection:
    imgsz: int = 640
    opset: Optional[int] = None  # None = Ultralytics' choice
    dynamic_batch: bool = False
    simplify: bool = True  # onnxslim
    parity_images: int = 4  # real images compared ONNX Runtime vs PyTorch after every export
    int8_calib_images: Optional[int] = None  # None: per engine (ort 32, nncf 128), see quantize.calib_count
    int8_max_map_drop: float = 0.010  # refuse INT8 when mAP50-95 drops more than this (absolute)
    # Who makes the INT8 file: ONNX Runtime's quantizer (U8S8, fastest on ORT) or NNCF (OpenVINO-style
    # QDQ, fastest on OpenVINO, slow on ORT); auto = nncf when the target backend is OpenVINO and nncf is
    # installed, else ort (bench/results/nncf.md).
    int8_engine: Literal["auto", "ort", "nncf"] = "auto"


@dataclass
class BuildSection:
    # milliseconds (40), or a fraction of the unpruned model's latency on the device (0.7x)
    target_ms: Optional[str] = None
    percentile: Literal["p50", "p90", "p95", "p99"] = "p95"
    imgsz: int = 640
    threads: int = 2
    epochs: int = 10
    max_ratio: float = 0.7  # the search never removes more than this share of channels
    ratio_step: float = 0.05  # the pruning grid: ratio_step, 2 * ratio_step, ... up to max_ratio
    max_measurements: int = 10  # device profile calls per build (the baseline is measured twice)
    # The accuracy floor: never package a model whose mAP50-95 is more than this (absolute) below the
    # unpruned FP32 model at the requested size. 3 points: the loss detector users accept for a
    # deployment speed-up (INT8 and pruning papers report <= 1 point as lossless, 2-3 as the edge).
    max_map_drop: float = 0.03
    recovery_epochs: Optional[int] = None  # short recovery after a verification miss (default epochs // 3, >= 1)
    # auto: full-width precision/runtime changes that pass the accuracy gate before any pruning
    precision: Literal["auto", "fp32", "int8", "bf16"] = "auto"
    backend: Literal["auto", "ort", "openvino"] = "auto"  # auto: what the device has (a remote device: ort)
    imgsz_steps: int = 2  # precision auto: also try inputs 32, 64, ... pixels smaller (gated), 0 = never
    # precision auto: also try a rectangular input of the dataset's median aspect ratio (640x480 for
    # 4:3 images), which drops the square input's letterbox padding (gated); square = never
    input_shape: Literal["auto", "square"] = "auto"
    device: str = "local"  # local, or a device id reached over MQTT (mqtt section)
    profile_timeout_s: float = 300.0  # remote profile answer timeout
    out: str = "build"


@dataclass
class RolloutSection:
    canary: int = 1  # devices updated and gated first; any canary failure stops the rollout
    batch: str = "10%"  # devices per batch after the canary: a count or a share of the selected devices
    max_failures: str = "0"  # failures (count or share) tolerated before the rollout stops and rolls back
    gate_p95_ms: Optional[float] = None  # live p95 limit; None = the package's own target (manifest)
    soak_s: float = 60.0  # how long an updated device must stay within the gate
    parallel: int = 16  # devices updated at once within a batch
    deploy_timeout_s: float = 120.0  # a device's deploy answer
    rollback_timeout_s: float = 60.0  # a device's rollback answer and the retained status confirming it
    state_dir: str = "~/.local/state/prune-pack/rollouts"  # append-only audit logs (one JSONL file per rollout)


@dataclass
class ExporterSection:
    listen: str = "127.0.0.1:9108"  # prune-pack exporter: HOST:PORT of /metrics (9108: free in Prometheus' port list)


@dataclass
class DashboardSection:
    listen: str = "127.0.0.1:8108"  # prune-pack dashboard: HOST:PORT of the live page
    history_points: int = 720  # latency points kept per stream for the chart (one per telemetry message)
