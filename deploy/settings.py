"""Typed configuration sections of the host side (validated by ``prune_pack.config``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class PruneSection:
    criterion: str = "auto"  # l1, l2, bn_scale, taylor, act_var, or auto (the measured default)
    max_layer_ratio: float = 0.75  # no layer loses more than this share of its channels
    round_to: int = 8  # prunable widths are multiples of this (SIMD); small layers are kept whole
    calib_images: int = 32  # images used by data-aware criteria, sensitivity and bias compensation
    # How consumers make up for removed channels: least-squares refit of the kept weights and bias
    # (measured best), the removed channels' mean activation folded into the bias, or nothing.
    compensation: Literal["lsq", "mean", "none"] = "lsq"
    allocation: Literal["uniform", "global", "sensitivity"] = "sensitivity"


@dataclass
class FinetuneSection:
    epochs: int = 10
    lr0: float = 0.002  # about 1/10 of Ultralytics' training lr
    batch: int = 16
    workers: int = 2  # dataloader workers
    distill: bool = False  # distil from the unpruned model (measured: no gain on short CPU budgets, see docs/benchmarks.md)
    distill_weight: float = 1.0
    patience: int = 0  # 0 = no early stopping


@dataclass
class ExportSection:
    imgsz: int = 640
    opset: Optional[int] = None  # None = Ultralytics' choice
    dynamic_batch: bool = False
    simplify: bool = True  # onnxslim
    parity_images: int = 4  # real images compared ONNX Runtime vs PyTorch after every export
    int8_calib_images: int = 32
    int8_max_map_drop: float = 0.010  # refuse INT8 when mAP50-95 drops more than this (absolute)


@dataclass
class BuildSection:
    target_ms: Optional[float] = None
    percentile: Literal["p50", "p90", "p95", "p99"] = "p95"
    imgsz: int = 640
    threads: int = 2
    epochs: int = 10
    max_ratio: float = 0.7  # the search never removes more than this share of channels
    max_measurements: int = 8  # device profile calls per build
    precision: Literal["auto", "fp32", "int8", "bf16"] = "fp32"
    backend: Literal["auto", "ort", "openvino"] = "ort"
    device: str = "local"  # local, or a device id reached over MQTT (mqtt section)
    profile_timeout_s: float = 300.0  # remote profile answer timeout
    out: str = "build"
