"""The host-side work behind the build's search: prune, export, quantize, profile on the device,
validate, recover and package -- each artifact cached in the work area for ``--resume``."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Hashable, Optional

from prune_pack.deploy.build_state import WorkArea
from prune_pack.imgsz import ImgSz, shape_str
from prune_pack.deploy.search import Candidate, Measurement

# The most of an un-recovered mAP drop that any measured recovery won back (yolov8n-coco 20 %
# pruned: 0.169 -> 0.384 of 0.428 with frames of the val distribution, 83 %; docs/benchmarks.md).
# A ratio whose un-recovered drop would need more than this to come back within the floor is not
# worth a device measurement.
RECOVERY_SHARE = 0.85


def log(msg: str) -> None:
    # Progress goes to stderr so that --json keeps stdout to one JSON line.
    print(f"build: {msg}", file=sys.stderr, flush=True)


def _steal_seconds() -> float:
    import psutil

    return float(getattr(psutil.cpu_times(), "steal", 0.0))


class Pipeline:
    """Artifacts and device calls for one build. ``opts`` is the build's ``BuildOptions``."""

    def __init__(self, opts: Any, work: WorkArea, model_pt: Path, data_src: Path, data_yaml: Path, key_path: Path,
                 names: dict[int, str]) -> None:
        self.opts, self.work, self.model_pt, self.data_src, self.data_yaml = opts, work, model_pt, data_src, data_yaml
        self.key_path, self.names = key_path, names
        self.cfg = opts.cfg
        self.remote: Any = None
        self.version = 0
        self.val_cache = work.state.val
        self.calib_cache: dict = {}  # calibration statistics shared by every ratio this build prunes

    # ---------------------------------------------------------------- artifacts (cached on disk)
    def pruned(self, ratio: float) -> tuple[Path, dict]:
        if ratio == 0:
            return self.model_pt, {}
        d = self.work.dir / "pruned"
        pt, info_path = d / f"r{ratio:.3f}.pt", d / f"r{ratio:.3f}.json"
        if pt.is_file() and info_path.is_file():
            return pt, json.loads(info_path.read_text())
        from prune_pack.pruning.checkpoint import save_pruned
        from prune_pack.pruning.prune import prune_model

        pc = self.cfg.prune
        with self.work.phase("prune"):
            log(f"pruning {ratio:.0%} of the channels ({pc.allocation} allocation)")
            yolo, info = prune_model(self.model_pt, ratio, criterion=self.opts.criterion or pc.criterion,
                                     data_yaml=self.data_yaml, imgsz=self.opts.imgsz, allocation=pc.allocation,
                                     max_layer_ratio=pc.max_layer_ratio, round_to=pc.round_to,
                                     calib_images=pc.calib_images, compensation=pc.compensation,
                                     recalibrate_bn=pc.recalibrate_bn, calib_cache=self.calib_cache,
                                     unlabeled=self.opts.unlabeled)
            d.mkdir(parents=True, exist_ok=True)
            save_pruned(yolo, pt, info)
            info_path.write_text(json.dumps(info, default=str))
        return pt, info

    def widths(self, c: Candidate) -> Hashable:
        _, info = self.pruned(c.ratio)
        return {k: v[1] for k, v in sorted((info.get("widths") or {}).items())}

    def onnx(self, c: Candidate) -> Path:
        from prune_pack.deploy.export import export_onnx

        pt, _ = self.pruned(c.ratio)
        d = self.work.dir / "onnx"
        fp32 = d / f"r{c.ratio:.3f}-{shape_str(c.imgsz)}.onnx"
        if not fp32.is_file():
            with self.work.phase("export"):
                log(f"exporting r={c.ratio:.2f} to ONNX at {shape_str(c.imgsz)}")
                export_onnx(pt, fp32.with_suffix(".tmp.onnx"), imgsz=c.imgsz)
                os.replace(fp32.with_suffix(".tmp.onnx"), fp32)
        if c.precision != "int8":
            return fp32
        engine = self.int8_engine(c)
        q = d / f"r{c.ratio:.3f}-{shape_str(c.imgsz)}-int8{'-nncf' if engine == 'nncf' else ''}.onnx"
        if not q.is_file():
            from prune_pack.deploy.export import int8_calibration_images
            from prune_pack.deploy.quantize import quantize_int8_with

            with self.work.phase("quantize"):
                calib = int8_calibration_images(self.data_yaml, engine, self.cfg.export.int8_calib_images,
                                                self.opts.unlabeled)
                log(f"quantizing r={c.ratio:.2f} to INT8 with {engine} ({len(calib)} calibration images)")
                quantize_int8_with(engine, fp32, q.with_suffix(".tmp.onnx"), calib, c.imgsz)
                os.replace(q.with_suffix(".tmp.onnx"), q)
        return q

    def int8_engine(self, c: Candidate) -> str:
        """``export.int8_engine`` for the backend that will run ``c`` (auto: nncf for OpenVINO)."""
        from prune_pack.deploy.quantize import resolve_int8_engine

        return resolve_int8_engine(self.cfg.export.int8_engine, c.backend)

    def candidate_package(self, c: Candidate) -> Path:
        """Remote devices take packages (signed, so a device with trusted keys accepts them)."""
        from prune_pack.agent.package import write_package

        pkg = self.work.dir / "packages" / f"{c.key}.ppk"
        if not pkg.is_file():
            self.version += 1
            man = {"name": "prune-pack-build-candidate", "version": int(time.time()) * 100 + self.version,
                   "precision": c.precision, "imgsz": c.imgsz, "names": [self.names[k] for k in sorted(self.names)],
                   "validated": [{"backend": c.backend, "precision": c.precision}],
                   "provenance": {"candidate": c.key, "base_sha256": self.work.state.model_sha256}}
            write_package(self.onnx(c), man, pkg, signing_key=self.key_path, registry=self.work.dir / "versions.json")
        return pkg

    # ---------------------------------------------------------------- device
    def profile(self, target: Path, c: Candidate, package: bool) -> Measurement:
        pcfg = self.cfg.profile
        with self.work.phase("profile"):
            if self.opts.device == "local":
                from prune_pack.agent.profiler import profile_model

                kw: dict[str, Any] = {"trusted_keys": [self.key_path.with_suffix(".pub")]} if package else {}
                steal0, t0 = _steal_seconds(), time.monotonic()
                r = profile_model(str(target), threads=self.opts.threads, warmup=pcfg.warmup, runs=pcfg.runs,
                                  seconds=pcfg.seconds, backend=c.backend, precision=c.precision, **kw)
                wall = max(1e-6, time.monotonic() - t0) * (os.cpu_count() or 1)
                r.setdefault("context", {})["steal_percent"] = round(100.0 * (_steal_seconds() - steal0) / wall, 2)
            else:
                pkg = target if package else self.candidate_package(c)
                r = self.device().profile_package(pkg, backend=c.backend, precision=c.precision, runs=pcfg.runs,
                                                  warmup=pcfg.warmup, seconds=pcfg.seconds, threads=self.opts.threads,
                                                  timeout=self.opts.profile_timeout_s, retries=1, force=True)
        ctx = r.get("context") or {}
        r = {k: v for k, v in r.items() if k not in ("context", "model")}
        # What makes the number comparable (and a busy machine visible in the report).
        r["context"] = {k: ctx.get(k) for k in ("cpu_model", "usable_cores", "loadavg", "steal_percent", "governor")
                        if ctx.get(k) is not None}
        return Measurement(r)

    def device(self) -> Any:
        if self.remote is None:
            from prune_pack.deploy.remote import RemoteDevice

            self.remote = RemoteDevice(self.cfg.mqtt, self.opts.device, site=self.cfg.device.site, broker=self.opts.broker,
                                       max_inline_mb=self.cfg.agent.max_inline_mb)
            self.remote.connect()
        return self.remote

    def measure(self, c: Candidate) -> Measurement:
        m = self.profile(self.onnx(c), c, package=False)
        pct = self.opts.percentile
        lo, hi = m.bounds(pct)
        log(f"measured {c.key}: {pct} {m.point(pct):.1f} ms (95% CI {lo:.1f}-{hi:.1f})")
        return m

    def measure_package(self, c: Candidate) -> Measurement:
        m = self.profile(Path(self.work.state.packages[c.key]["out"]), c, package=True)
        pct = self.opts.percentile
        lo, hi = m.bounds(pct)
        log(f"verified {c.key} ({'recovered ' if c.ratio > 0 else ''}package): {pct} {m.point(pct):.1f} ms "
            f"(95% CI {lo:.1f}-{hi:.1f})")
        return m

    # ---------------------------------------------------------------- accuracy
    def validate(self, path: Path, key: str, openvino: bool = False, imgsz: Optional[ImgSz] = None) -> dict:
        """mAP on the val split, cached by ``key`` (OpenVINO: what runs an NNCF or bf16 file)."""
        if key not in self.val_cache:
            with self.work.phase("validate"):
                log(f"validating {key}{' (OpenVINO)' if openvino else ''} on the val split")
                if openvino:
                    from prune_pack.deploy.export import validate_openvino

                    self.val_cache[key] = validate_openvino(path, self.data_yaml, imgsz or self.opts.imgsz)
                else:
                    from prune_pack.pruning.finetune import validate

                    self.val_cache[key] = validate(str(path), str(self.data_yaml), imgsz=imgsz or self.opts.imgsz)
        return self.val_cache[key]

    def reference(self) -> dict:
        """The unpruned FP32 ONNX model at the requested size: every gate and the floor compare to it."""
        ref = Candidate(0.0, "ort", "fp32", self.opts.imgsz)
        return self.validate(self.onnx(ref), ref.key)

    def gate(self, c: Candidate) -> bool:
        """Accuracy gate of a full-width lever: its mAP50-95 (precision and input size together) must
        stay within export.int8_max_map_drop of FP32 at the requested input size."""
        if c.precision == "fp32" and c.imgsz == self.opts.imgsz:
            return True  # the same FP32 math on another runtime
        from prune_pack.deploy.quantize import AccuracyGateError, int8_gate

        fp32 = self.reference()
        if c.precision == "bf16":
            from prune_pack.deploy.export import openvino_precision

            if openvino_precision(self.onnx(c)) != "bf16":
                log("OpenVINO would not run this model in bf16 here: the bf16 lever cannot be validated")
                return False
        # An NNCF or bf16 file is gated on what OpenVINO computes: that is what will run it.
        on_ov = c.precision == "bf16" or (c.precision == "int8" and self.int8_engine(c) == "nncf")
        q = self.validate(self.onnx(c), c.key, openvino=on_ov, imgsz=c.imgsz if on_ov else None)
        what = c.precision.upper() + (f" at {shape_str(c.imgsz)}" if c.imgsz != self.opts.imgsz else "")
        try:
            drop = int8_gate(fp32["map50_95"], q["map50_95"], self.cfg.export.int8_max_map_drop, what=what)
            log(f"{what} accuracy gate passed (mAP50-95 drop {drop:+.4f})")
            return True
        except AccuracyGateError as e:
            log(str(e))
            return False

    def lever_drop(self, c: Candidate) -> Optional[float]:
        """mAP50-95 a full-width lever costs against the reference, as its gate measured it (None:
        not validated, e.g. bf16 that OpenVINO would not run here)."""
        q = self.val_cache.get(c.key)
        return None if q is None else self.reference()["map50_95"] - q["map50_95"]

    def pruned_drop(self, ratio: float) -> float:
        """mAP50-95 pruning ``ratio`` costs before any recovery."""
        pt, _ = self.pruned(ratio)
        return self.reference()["map50_95"] - self.validate(pt, f"pruned-r{ratio:.3f}")["map50_95"]

    def best_recovered_drop(self, ratio: float) -> float:
        """The least mAP50-95 cost pruning ``ratio`` can end at: its un-recovered drop less what recovery
        has ever won back (``RECOVERY_SHARE``, from the H200 measurement)."""
        return self.pruned_drop(ratio) * (1.0 - RECOVERY_SHARE)

    def viable(self, c: Candidate) -> bool:
        """The floor before recovery: a pruning ratio whose best recovered cost is beyond the floor is
        not worth measuring."""
        if c.ratio == 0:
            return True
        ok = self.best_recovered_drop(c.ratio) <= self.opts.max_map_drop
        if not ok:
            log(f"pruning {c.ratio:.0%} leaves mAP50-95 {self.pruned_drop(c.ratio) * 100:.1f} points below the "
                f"unpruned model before recovery: beyond the {self.opts.max_map_drop * 100:g}-point floor even after "
                "the best recovery measured; not measuring it or anything harsher")
        return ok

    # ---------------------------------------------------------------- recovery and the package
    def recovered(self, c: Candidate, short: bool) -> Path:
        """One full recovery at the chosen point (or a short one after a step), cached for --resume."""
        opts, st = self.opts, self.work.state
        tag = f"r{c.ratio:.3f}{'-short' if short else ''}"
        done = st.recovered.get(tag)
        if done and Path(done["pt"]).is_file():
            log(f"reusing the finished recovery {tag}")
            return Path(done["pt"])
        from prune_pack.pruning.recover import recover

        pt, _ = self.pruned(c.ratio)
        fc = self.cfg.finetune
        epochs = opts.epochs if not short else (opts.recovery_epochs or max(1, opts.epochs // 3))
        out = self.work.dir / "recovered" / f"{tag}.pt"
        with self.work.phase("finetune"):
            log(f"recovering r={c.ratio:.2f} for {epochs} epoch(s){' (short recovery)' if short else ''}"
                + (f" on the frames in {opts.unlabeled}" if opts.unlabeled else ""))
            r = recover(pt, self.data_yaml, out, method=fc.method, teacher=self.model_pt, imgsz=opts.imgsz,
                        epochs=epochs, fraction=opts.finetune_fraction, lr=fc.lr0, batch=fc.batch, workers=fc.workers,
                        train_device=opts.train_device or fc.train_device, unlabeled=opts.unlabeled,
                        labels_distill=fc.distill, distill_weight=fc.distill_weight, patience=fc.patience,
                        measure=False, progress=False)
        st.recovered[tag] = {"pt": str(out), "method": r["method"], "epochs": r.get("epochs", epochs),
                             "seconds": r.get("seconds"), "train_device": r.get("train_device"),
                             "frames": r.get("frames")}
        self.work.save()
        return out

    def final_package(self, c: Candidate, final_pt: Path, name: str, target_ms: float) -> dict:
        """Export, parity check, (INT8 with its gate), validation and the signed package of ``c``."""
        from prune_pack.deploy.export import export_package

        st = self.work.state
        d = self.work.dir / "final" / c.key
        cached = st.packages.get(c.key)
        if cached and Path(cached["out"]).is_file() and cached.get("source") == str(final_pt):
            return cached
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)

        def val_fn(path: Any, data: Any, imgsz: ImgSz) -> dict:
            # The exporter validates the ONNX it packs; keep the full result (per class) for the report.
            return self.validate(Path(path), f"final-{c.key}-{Path(path).name}")

        with self.work.phase("package"):
            log(f"exporting, checking parity and packing {c.key}")
            r = export_package(final_pt, d / f"{name}.ppk", imgsz=c.imgsz, int8=c.precision == "int8",
                               data_yaml=self.data_yaml, sign=self.key_path, name=name, latency_runs=0,
                               calib_images=self.cfg.export.int8_calib_images, unlabeled=self.opts.unlabeled,
                               # the build chose this lever knowing its cost; the floor (check_floor,
                               # against the unpruned model) is what the package answers to
                               max_map_drop=max(self.cfg.export.int8_max_map_drop, self.opts.max_map_drop),
                               val_fn=val_fn,
                               registry=self.work.dir / "versions.json", int8_engine=self.int8_engine(c),
                               backends=("ort", "openvino") if c.backend == "openvino" or self.opts.backend == "auto"
                               else ("ort",),
                               # what the device's dashboards and alerts compare its live latency with
                               target={"latency_ms": round(target_ms, 3), "percentile": self.opts.percentile})
        r = {k: v for k, v in r.items() if k != "summary"}
        r["source"] = str(final_pt)
        r["after"] = (r.pop("accuracy", None) or {}).get(c.precision if c.precision == "int8" else "fp32")
        st.packages[c.key] = r
        self.work.save()
        return r

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
