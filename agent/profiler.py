"""On-device latency profiler: the number the build search optimises, measured where it matters.

One session per (backend, precision) with explicit threads; warm-up runs are excluded; the timed
loop holds nothing but ``perf_counter_ns`` and ``session.run``. Percentiles are taken by position
in the sorted latencies (index ``floor(n * q)``, as ONNX Runtime's perf_test does), each with a
distribution-free 95 % confidence interval from order statistics, so a caller can tell a real
difference from noise. Every result carries the context that makes it comparable (CPU, cores,
affinity, governor, load, runtime versions, model hash, input shape, threads).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import psutil

from prune_pack.agent import backends as be
from prune_pack.agent.manifest import sha256_file
from prune_pack.agent.keys import host_trusted_keys, unsigned_on_host
from prune_pack.errors import PackageRejected, PrunePackError, UserInputError

QUANTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}
CI_LEVEL = 0.95
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_IMAGES = 16  # preprocessed inputs kept in memory (640x640 float32 = 4.9 MB each; counted in rss_peak_mb)


# ---------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The value at position ``floor(n * q)`` of an ascending list (ORT perf_test's convention)."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("no values")
    return float(sorted_values[min(int(n * q), n - 1)])


def _binom_cdf_table(n: int, q: float) -> list[float]:
    """P(B <= k) for k = 0..n, B ~ Binomial(n, q), in log space (n can be 10^5 with --seconds)."""
    if q <= 0.0 or q >= 1.0:
        raise ValueError("q must be within (0, 1)")
    lq, l1q = math.log(q), math.log1p(-q)
    lgn = math.lgamma(n + 1)
    cdf, acc = [], 0.0
    for k in range(n + 1):
        acc += math.exp(lgn - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lq + (n - k) * l1q)
        cdf.append(min(acc, 1.0))
    return cdf


def quantile_ci_ranks(n: int, q: float, level: float = CI_LEVEL) -> tuple[Optional[int], Optional[int]]:
    """1-based ranks (l, u) with P(X_(l) <= ξ_q <= X_(u)) >= level, distribution-free.

    The number of samples below the true quantile ξ_q is Binomial(n, q), so
    P(X_(l) <= ξ_q < X_(u)) = F(u-1) - F(l-1). l is the largest rank with F(l-1) <= α/2, u the
    smallest with F(u-1) >= 1-α/2; None where n is too small for that side (e.g. p99 of 100 runs).
    """
    alpha = 1.0 - level
    cdf = _binom_cdf_table(n, q)
    lo: Optional[int] = None
    for r in range(1, n + 1):  # F(r-1) grows with r
        if cdf[r - 1] <= alpha / 2:
            lo = r
        else:
            break
    hi: Optional[int] = None
    for r in range(1, n + 1):
        if cdf[r - 1] >= 1 - alpha / 2:
            hi = r
            break
    return lo, hi


def latency_stats(latencies_ms: Sequence[float], level: float = CI_LEVEL) -> dict[str, Any]:
    """p50/p90/p95/p99 (+ confidence intervals), mean, min, max, std of a list of latencies in ms."""
    xs = sorted(float(v) for v in latencies_ms)
    n = len(xs)
    if n == 0:
        raise ValueError("no latencies")
    out: dict[str, Any] = {}
    for name, q in QUANTILES.items():
        out[f"{name}_ms"] = round(percentile(xs, q), 4)
    for name, q in QUANTILES.items():
        lo, hi = quantile_ci_ranks(n, q, level)
        out[f"{name}_ci_ms"] = [round(xs[lo - 1], 4) if lo else None, round(xs[hi - 1], 4) if hi else None]
    out["ci_level"] = level
    out["mean_ms"] = round(sum(xs) / n, 4)
    out["min_ms"] = round(xs[0], 4)
    out["max_ms"] = round(xs[-1], 4)
    out["std_ms"] = round(float(np.std(xs, ddof=1)) if n > 1 else 0.0, 4)
    return out


# ---------------------------------------------------------------- context


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "Hardware", "Processor")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_context() -> dict[str, Any]:
    """What makes a latency comparable: the CPU, the cores this process may use, and the load on them."""
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = list(range(os.cpu_count() or 1))
    features = be.cpu_features()
    cpu_max = _read("/sys/fs/cgroup/cpu.max")  # cgroup v2 CPU quota, e.g. "200000 100000" = 2 CPUs
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    import onnxruntime as ort

    return {
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(affinity),
        "affinity": affinity,
        "cgroup_cpu_max": cpu_max,
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "cpu_flags": sorted(f for f in be.RELEVANT_FLAGS if f in features),
        "cpu_flags_overridden": os.environ.get(be.CPU_FLAGS_ENV) is not None,
        "loadavg": load,
        "memory_total_mb": round(psutil.virtual_memory().total / 2**20, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "backends_available": be.available_backends(),
    }


# ---------------------------------------------------------------- peak RSS


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> Optional[float]:
    status = _read("/proc/self/status") or ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


# ---------------------------------------------------------------- inputs


def random_input(shape: Sequence[int], dtype: str, seed: int = 0) -> np.ndarray:
    """A random tensor like a preprocessed image: uniform [0, 1) floats or uniform bytes."""
    rng = np.random.default_rng(seed)
    if dtype in ("uint8", "int8"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max + 1, size=tuple(shape), dtype=dtype)
    return rng.random(tuple(shape), dtype=np.float32).astype(dtype, copy=False)


def image_inputs(folder: str | Path, shape: Sequence[int], dtype: str = "float32", limit: int = MAX_IMAGES) -> list[np.ndarray]:
    """Real images from a folder, preprocessed exactly as Ultralytics does (``agent.detect.preprocess``)."""
    import cv2

    from prune_pack.agent.detect import preprocess

    d = Path(folder)
    if not d.is_dir():
        raise UserInputError(f"images folder not found: {d}")
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    out = []
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if img is None:
            continue  # unreadable or not an image after all
        x, _ = preprocess(img, shape, dtype)
        if shape[0] > 1:  # a static batch > 1: the same frame in every slot
            x = np.ascontiguousarray(np.repeat(x, shape[0], axis=0))
        out.append(x)
    if not out:
        raise UserInputError(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) in {d}")
    return out


# ---------------------------------------------------------------- models and packages


@contextlib.contextmanager
def open_model(model: str | Path, trusted_keys: Iterable[str | Path] = (), revoked_keys: Iterable[str | Path] = (),
               allow_unsigned: bool = False, max_bytes: Optional[int] = None,
               require_package: bool = False) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(onnx_path, facts)`` for an .onnx file or a .ppk package.

    A package is verified (hashes, signature) into a private staging folder, profiled from there,
    and the folder is removed afterwards: the profiler never runs an unverified model file.
    """
    p = Path(model)
    if not p.is_file():
        raise UserInputError(f"model not found: {p}")
    suffix = p.suffix.lower()
    if not require_package and suffix != ".ppk" and (suffix == ".onnx" or not zipfile.is_zipfile(p)):
        yield p, {"source": "onnx"}
        return
    from prune_pack.agent.verifier import verify_package

    staging = Path(tempfile.mkdtemp(prefix="prune-pack-profile-"))
    try:
        kw: dict[str, Any] = {"revoked_keys": tuple(revoked_keys), "allow_unsigned": allow_unsigned, "staging_root": staging}
        if max_bytes is not None:
            kw["max_bytes"] = max_bytes
        vp = verify_package(p, tuple(trusted_keys), **kw)
        m = vp.manifest or {}
        yield Path(vp.model_path), {
            "source": "package",
            "package": str(p),
            "name": m.get("name"),
            "version": m.get("version"),
            "manifest_precision": m.get("precision"),
            "key_id": getattr(vp, "key_id", None),
            "signed": getattr(vp, "signed", None),
            "manifest": m,
        }
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- measurement


def measure(run: Any, inputs: Sequence[np.ndarray], warmup: int, runs: int, seconds: Optional[float]) -> list[int]:
    """Latencies in ns of ``run(x)`` after ``warmup`` untimed runs; ``seconds`` (if set) replaces ``runs``.

    Inputs are picked before the clock starts; nothing but the call sits between the two reads.
    """
    k = len(inputs)
    for i in range(warmup):
        run(inputs[i % k])
    pc = time.perf_counter_ns
    if seconds is None:
        lat = [0] * runs
        for i in range(runs):
            x = inputs[i % k]
            t0 = pc()
            run(x)
            lat[i] = pc() - t0
        return lat
    lat = []
    deadline = pc() + int(seconds * 1e9)
    i = 0
    while True:
        x = inputs[i % k]
        t0 = pc()
        run(x)
        t1 = pc()
        lat.append(t1 - t0)
        i += 1
        if t1 >= deadline:
            return lat


def _profile_path(onnx_path: Path, sha: str, backend: str, precision: Optional[str], threads: int, warmup: int,
                  runs: int, seconds: Optional[float], images: Optional[str | Path], cache_dir: Optional[str | Path]
                  ) -> dict[str, Any]:
    gc.collect()  # free a previous session before the peak-RSS mark is reset
    hwm_reset = _reset_peak_rss()
    session = be.load_session(onnx_path, backend, precision, threads, cache_dir)
    if images:
        inputs = image_inputs(images, session.input_shape, session.input_dtype)
        source = "images"
    else:
        inputs = [random_input(session.input_shape, session.input_dtype)]
        source = "random"
    proc = psutil.Process()
    cpu0 = proc.cpu_times()
    t0 = time.perf_counter_ns()
    lat_ns = measure(session.run, inputs, warmup, runs, seconds)
    wall_s = (time.perf_counter_ns() - t0) / 1e9
    cpu1 = proc.cpu_times()
    # cpu_times covers the warm-up too; so does wall_s: the ratio is the process's CPU share.
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    lat_ms = [v / 1e6 for v in lat_ns]
    measured_s = sum(lat_ns) / 1e9
    out: dict[str, Any] = {"backend": session.backend, "precision": session.precision}
    out.update(latency_stats(lat_ms))
    out.update({
        "runs": len(lat_ms),
        "warmup": warmup,
        "seconds": seconds,
        "threads": threads,
        "throughput_ips": round(len(lat_ms) / measured_s, 3) if measured_s > 0 else None,
        "rss_peak_mb": _peak_rss_mb(),  # includes the inputs (inputs_mb)
        "rss_peak_scope": "session load + warm-up + runs" if hwm_reset else "process lifetime",
        "cpu_percent": round(100.0 * cpu_s / wall_s, 1) if wall_s > 0 else None,
        "model_sha256": sha,
        "input_shape": list(session.input_shape),
        "input_dtype": session.input_dtype,
        "input_source": source,
        "inputs": len(inputs),
        "inputs_mb": round(sum(x.nbytes for x in inputs) / 2**20, 1),
        "backend_info": session.info(),
        "latencies_ms": [round(v, 4) for v in lat_ms],
    })
    del session
    return out


def _check_counts(threads: int, warmup: int, runs: int, seconds: Optional[float]) -> None:
    if threads < 0:
        raise UserInputError(f"--threads must be >= 0, got {threads}")
    if warmup < 0:
        raise UserInputError(f"--warmup must be >= 0, got {warmup}")
    if seconds is None and runs < 1:
        raise UserInputError(f"--runs must be >= 1, got {runs}")
    if seconds is not None and not seconds > 0:
        raise UserInputError(f"--seconds must be > 0, got {seconds}")


def _as_list(v: Optional[str | Sequence[str]]) -> list[str]:
    if v is None:
        return []
    items = v.split(",") if isinstance(v, str) else list(v)
    return [s.strip().lower() for s in items if s and s.strip()]


def profile_model(model: str | Path, threads: int = 2, warmup: int = 10, runs: int = 100, seconds: Optional[float] = None,
                  backend: str = "ort", precision: Optional[str] = None, images: Optional[str | Path] = None,
                  trusted_keys: Iterable[str | Path] = (), allow_unsigned: bool = False,
                  cache_dir: Optional[str | Path] = None, revoked_keys: Iterable[str | Path] = (),
                  max_bytes: Optional[int] = None, require_package: bool = False) -> dict[str, Any]:
    """Profile an .onnx file or a .ppk package on one backend and precision (None = the file's own).

    ``backend`` may be ``auto`` (OpenVINO when installed, else ORT), or ``all`` / a comma-separated
    precision list, which delegates to ``profile_all``. Returns the statistics (see module doc) plus
    ``latencies_ms`` (every measured run, in order).
    """
    backends = _as_list(backend) or ["ort"]
    every_precision = _as_list(precision) == ["all"]  # every precision the file can run on each backend
    precisions = [] if every_precision else _as_list(precision)
    if every_precision or backends == ["all"] or len(backends) > 1 or len(precisions) > 1:
        return profile_all(model, backends=backends, precisions=precisions or None, threads=threads, warmup=warmup,
                           runs=runs, seconds=seconds, images=images, trusted_keys=trusted_keys,
                           allow_unsigned=allow_unsigned, cache_dir=cache_dir, revoked_keys=revoked_keys,
                           max_bytes=max_bytes, require_package=require_package)
    _check_counts(threads, warmup, runs, seconds)
    name = be.resolve_backend(backends[0], precisions[0] if precisions else None)
    with open_model(model, trusted_keys, revoked_keys, allow_unsigned, max_bytes, require_package) as (onnx_path, facts):
        sha = sha256_file(onnx_path)
        out = _profile_path(onnx_path, sha, name, precisions[0] if precisions else None, threads, warmup, runs,
                            seconds, images, cache_dir)
    _mark_validated(out, facts)
    out["model"] = _public(facts)
    out["context"] = device_context()
    return out


def _mark_validated(result: dict[str, Any], facts: dict[str, Any]) -> None:
    """For a package: was this backend/precision validated for accuracy on the host? (Measured either way.)"""
    manifest = facts.get("manifest")
    if manifest is None:
        return
    from prune_pack.agent.manifest import check_validated

    try:
        check_validated(manifest, result["backend"], result["precision"])
        result["validated"] = True
    except PrunePackError:
        result["validated"] = False


def _public(facts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in facts.items() if k != "manifest"}


def profile_all(model: str | Path, backends: Optional[Sequence[str]] = None, precisions: Optional[Sequence[str]] = None,
                threads: int = 2, warmup: int = 10, runs: int = 100, seconds: Optional[float] = None,
                images: Optional[str | Path] = None, trusted_keys: Iterable[str | Path] = (), allow_unsigned: bool = False,
                cache_dir: Optional[str | Path] = None, revoked_keys: Iterable[str | Path] = (),
                max_bytes: Optional[int] = None, require_package: bool = False) -> dict[str, Any]:
    """Every requested (backend, precision) that this file, this CPU and this install can run, one after another.

    ``backends`` None or ["all"] = every installed backend; ``precisions`` None = all the file can
    run on each backend. Combinations that cannot run are listed in ``skipped`` with the reason
    (an explicit request that runs nowhere is an error). The top-level profile keys are those of
    the fastest result by p50; ``results`` holds all of them.
    """
    _check_counts(threads, warmup, runs, seconds)
    req_b = [b for b in _as_list(backends) if b != "all"] if backends else []
    all_b = not req_b
    names = list(be.BACKENDS) if all_b else list(dict.fromkeys("ort" if b == "auto" else b for b in req_b))
    for b in names:
        if b not in be.BACKENDS:
            raise UserInputError(f"unknown backend {b!r} (expected all, {', '.join(be.BACKENDS)})")
    req_p = [be.normalize_precision(p) for p in _as_list(precisions)]
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with open_model(model, trusted_keys, revoked_keys, allow_unsigned, max_bytes, require_package) as (onnx_path, facts):
        sha = sha256_file(onnx_path)
        file_prec = be.model_precision(onnx_path)
        for b in names:
            if b not in be.available_backends():
                if not all_b:  # asked for by name: the missing extra is the user's error
                    be.resolve_backend(b)
                skipped.append({"backend": b, "precision": "*", "reason": f"{b} is not installed (pip install 'prune-pack[{b}]')"})
                continue
            for p in req_p or be.runnable_precisions(b, file_prec):
                try:
                    be.resolve_precision(b, p, file_prec)
                except PrunePackError as e:
                    skipped.append({"backend": b, "precision": str(p), "reason": str(e)})
                    continue
                r = _profile_path(onnx_path, sha, b, p, threads, warmup, runs, seconds, images, cache_dir)
                _mark_validated(r, facts)
                results.append(r)
    if not results:
        reasons = "; ".join(f"{s['backend']}/{s['precision']}: {s['reason']}" for s in skipped) or "nothing to run"
        raise UserInputError(f"no backend/precision can run this model: {reasons}")
    best = min(results, key=lambda r: r["p50_ms"])
    out = dict(best)
    out["model"] = _public(facts)
    out["context"] = device_context()
    out["fastest"] = {"backend": best["backend"], "precision": best["precision"]}
    out["results"] = results
    out["skipped"] = skipped
    return out


# ---------------------------------------------------------------- CLI


def _cache_dir(state_dir: str) -> Optional[Path]:
    """OpenVINO's blob cache under the agent's state dir, only where that dir already exists (a device)."""
    root = Path(state_dir)
    if not root.is_dir() or not os.access(root, os.W_OK):
        return None
    return root / "cache" / "openvino"


def _table(result: dict[str, Any]) -> str:
    rows = result.get("results") or [result]
    head = f"{'backend':<9} {'prec':<5} {'p50':>9} {'p90':>9} {'p95':>9} {'p99':>9} {'mean':>9} {'ips':>8} {'rss MB':>7} {'runs':>6}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['backend']:<9} {r['precision']:<5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['p95_ms']:>9.3f} "
            f"{r['p99_ms']:>9.3f} {r['mean_ms']:>9.3f} {r['throughput_ips'] or 0:>8.1f} {r['rss_peak_mb'] or 0:>7.0f} {r['runs']:>6}"
        )
    ctx = result.get("context", {})
    lines.append(
        f"latency in ms; {result['threads']} thread(s), input {'x'.join(map(str, result['input_shape']))} ({result['input_source']}), "
        f"{ctx.get('cpu_model')}, {ctx.get('usable_cores')} usable core(s), load {ctx.get('loadavg')}, "
        f"model sha256 {result['model_sha256'][:12]}"
    )
    for s in result.get("skipped", []):
        lines.append(f"skipped {s['backend']}/{s['precision']}: {s['reason']}")
    return "\n".join(lines)


def profile_kwargs(cfg: Any, **overrides: Any) -> dict[str, Any]:
    """``profile_model`` keyword arguments from a ``Config`` (its ``profile`` and ``agent`` sections),
    with ``overrides`` (None values ignored) on top: the CLI and the daemon's profile command share it.

    ``runs`` given without ``seconds`` switches a config's ``seconds`` off (an explicit run count wins).
    """
    prof, agent = cfg.profile, cfg.agent
    kw: dict[str, Any] = {
        "threads": prof.threads, "warmup": prof.warmup, "runs": prof.runs, "seconds": prof.seconds,
        "backend": prof.backend, "precision": prof.precision,
        "trusted_keys": list(agent.trusted_keys), "revoked_keys": list(agent.revoked_keys),
        "allow_unsigned": agent.allow_unsigned, "cache_dir": _cache_dir(agent.state_dir),
        "max_bytes": int(agent.max_package_mb * 2**20),
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if "runs" in given and "seconds" not in given:
        kw["seconds"] = None
    kw.update(given)
    return kw


def cli_profile(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """``prune-pack profile``: flags override the config's ``profile`` section, which overrides defaults."""
    kw = profile_kwargs(cfg, threads=args.threads, warmup=args.warmup, runs=args.runs, seconds=args.seconds,
                        backend=args.backend, precision=args.precision, images=args.images)
    kw["trusted_keys"] = host_trusted_keys(kw["trusted_keys"], args.pubkey or [])
    kw["allow_unsigned"] = bool(kw["allow_unsigned"] or getattr(args, "allow_unsigned", False))
    try:
        result = profile_model(args.model, **kw)
    except PackageRejected as e:
        raise unsigned_on_host(e, "profile") from None
    if not getattr(args, "latencies", False):
        result.pop("latencies_ms", None)
        for r in result.get("results", []):
            r.pop("latencies_ms", None)
    if not getattr(args, "json", False):
        result["summary"] = _table(result)
    return result
