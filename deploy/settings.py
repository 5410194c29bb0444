"""Typed configuration sections of the host side (validated by ``prune_pack.config``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


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
    target_ms: Optional[float] = None
    percentile: Literal["p50", "p90", "p95", "p99"] = "p95"
    imgsz: int = 640
    threads: int = 2
    epochs: int = 10
    max_ratio: float = 0.7  # the search never removes more than this share of channels
    max_measurements: int = 8  # device profile calls per build
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
