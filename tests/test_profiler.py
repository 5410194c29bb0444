"""The on-device profiler: statistics, the timed loop, inputs, packages, several backends, the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from prune_pack.agent import backends as be
from prune_pack.agent import profiler as pf
from prune_pack.cli import main
from prune_pack.errors import PackageRejected, UserInputError

TINY = Path(__file__).resolve().parent / "data" / "tiny.onnx"
HAVE_OV = "openvino" in be.available_backends()
KEYS = ("p50_ms p90_ms p95_ms p99_ms mean_ms min_ms max_ms std_ms runs warmup threads throughput_ips rss_peak_mb "
        "cpu_percent model_sha256 input_shape backend precision context p50_ci_ms p95_ci_ms p99_ci_ms").split()


@pytest.fixture(scope="module")
def tiny() -> Path:
    if not TINY.exists():
        pytest.skip(f"{TINY} is missing (tests/data/make_tiny_onnx.py writes it)")
    return TINY


# ---------------------------------------------------------------- statistics


def test_percentile_by_position():
    xs = list(range(1, 101))  # 1..100
    assert pf.percentile(xs, 0.50) == 51  # index floor(100 * 0.5) = 50, as ORT's perf_test
    assert pf.percentile(xs, 0.90) == 91
    assert pf.percentile(xs, 0.99) == 100
    assert pf.percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        pf.percentile([], 0.5)


def test_latency_stats_order_and_values():
    rng = np.random.default_rng(0)
    lat = list(rng.lognormal(3.0, 0.3, size=500))
    s = pf.latency_stats(lat)
    assert s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["mean_ms"] == pytest.approx(np.mean(lat), abs=1e-3)
    assert s["std_ms"] == pytest.approx(np.std(lat, ddof=1), abs=1e-3)
    for name in ("p50", "p90", "p95", "p99"):
        lo, hi = s[f"{name}_ci_ms"]
        assert lo is not None and hi is not None and lo <= s[f"{name}_ms"] <= hi


def test_ci_ranks_have_their_coverage():
    """The exact coverage of the order-statistic interval is >= 95 % and not absurdly wide."""
    for n, q in [(50, 0.5), (200, 0.9), (1000, 0.95), (1000, 0.99)]:
        lo, hi = pf.quantile_ci_ranks(n, q)
        cdf = pf._binom_cdf_table(n, q)
        coverage = cdf[hi - 1] - cdf[lo - 1]
        assert 0.95 <= coverage < 0.99, (n, q, lo, hi, coverage)
        assert lo <= math.floor(n * q) + 1 <= hi


def test_ci_is_open_where_runs_are_too_few():
    lo, hi = pf.quantile_ci_ranks(100, 0.99)
    assert hi is None and lo is not None  # 100 runs cannot bound p99 from above
    s = pf.latency_stats([1.0 + i / 100 for i in range(100)])
    assert s["p99_ci_ms"][1] is None and s["p50_ci_ms"][1] is not None


def test_ci_covers_the_true_quantile_in_simulation():
    """Empirical coverage on exponential samples, whose quantiles are known (-ln(1-q))."""
    rng = np.random.default_rng(1)
    n, q, trials = 200, 0.95, 1000
    lo, hi = pf.quantile_ci_ranks(n, q)
    true = -math.log(1 - q)
    samples = np.sort(rng.exponential(size=(trials, n)), axis=1)
    covered = np.mean((samples[:, lo - 1] <= true) & (true <= samples[:, hi - 1]))
    assert 0.93 <= covered <= 0.995, covered


# ---------------------------------------------------------------- the timed loop


def test_measure_excludes_warmup_and_counts_runs():
    calls: list[int] = []
    inputs = [np.array([1]), np.array([2]), np.array([3])]
    lat = pf.measure(lambda x: calls.append(int(x[0])), inputs, warmup=4, runs=7, seconds=None)
    assert len(lat) == 7 and len(calls) == 11 and all(isinstance(v, int) and v >= 0 for v in lat)
    assert calls == [1, 2, 3, 1] + [1, 2, 3, 1, 2, 3, 1]  # inputs cycle; warm-up first, untimed


def test_measure_for_a_duration():
    lat = pf.measure(lambda x: sum(range(1000)), [np.zeros(1)], warmup=0, runs=1, seconds=0.05)
    assert len(lat) > 1


# ---------------------------------------------------------------- profile_model


def test_profile_model_onnx(tiny):
    r = pf.profile_model(tiny, threads=1, warmup=3, runs=25)
    for k in KEYS:
        assert k in r, k
    assert r["runs"] == 25 and len(r["latencies_ms"]) == 25 and r["warmup"] == 3 and r["threads"] == 1
    assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["p50_ms"] == pf.percentile(sorted(r["latencies_ms"]), 0.5)
    assert r["model_sha256"] == hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert r["input_shape"] == [1, 3, 64, 64] and r["input_source"] == "random"
    assert (r["backend"], r["precision"]) == ("ort", "fp32")
    assert r["backend_info"]["intra_op_threads"] == 1 and r["backend_info"]["providers"] == ["CPUExecutionProvider"]
    assert r["rss_peak_mb"] > 10 and r["throughput_ips"] > 0 and r["cpu_percent"] >= 0
    ctx = r["context"]
    assert ctx["cpu_model"] and ctx["usable_cores"] >= 1 and ctx["onnxruntime"] and "ort" in ctx["backends_available"]
    assert "governor" in ctx and "cpu_flags" in ctx and r["model"] == {"source": "onnx"}
    json.dumps(r)  # the daemon sends it over MQTT


def test_profile_model_seconds(tiny):
    r = pf.profile_model(tiny, threads=1, warmup=1, seconds=0.2)
    assert r["runs"] == len(r["latencies_ms"]) > 1 and r["seconds"] == 0.2


def test_profile_model_bad_arguments(tiny, tmp_path):
    with pytest.raises(UserInputError, match="model not found"):
        pf.profile_model(tmp_path / "nope.onnx")
    with pytest.raises(UserInputError, match="--runs must be >= 1"):
        pf.profile_model(tiny, runs=0)
    with pytest.raises(UserInputError, match="--seconds must be > 0"):
        pf.profile_model(tiny, seconds=0)


def _write_images(d: Path) -> None:
    import cv2

    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 96), (80, 40), (64, 64)]):
        cv2.imwrite(str(d / f"im{i}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    (d / "notes.txt").write_text("not an image")


def test_image_inputs_are_letterboxed(tmp_path):
    _write_images(tmp_path / "imgs")
    xs = pf.image_inputs(tmp_path / "imgs", (1, 3, 64, 64))
    assert len(xs) == 3
    for x in xs:
        assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    wide = xs[0]  # 48x96 -> 32x64 content, 16 rows of gray 114 above and below
    np.testing.assert_allclose(wide[0, :, :16, :], 114 / 255, atol=1e-6)
    np.testing.assert_allclose(wide[0, :, -16:, :], 114 / 255, atol=1e-6)
    with pytest.raises(UserInputError, match="no readable images"):
        (tmp_path / "empty").mkdir()
        pf.image_inputs(tmp_path / "empty", (1, 3, 64, 64))


def test_profile_with_real_images(tiny, tmp_path):
    _write_images(tmp_path / "imgs")
    r = pf.profile_model(tiny, threads=1, warmup=1, runs=6, images=tmp_path / "imgs")
    assert r["input_source"] == "images" and r["inputs"] == 3 and r["runs"] == 6


# ---------------------------------------------------------------- several backends


def test_profile_all_reports_every_combination_and_the_fastest(tiny, monkeypatch):
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "avx2 avx512f")  # no bf16: fp32 only
    r = pf.profile_model(tiny, threads=1, warmup=1, runs=8, backend="all")
    combos = {(x["backend"], x["precision"]) for x in r["results"]}
    expected = {("ort", "fp32")} | ({("openvino", "fp32")} if HAVE_OV else set())
    assert combos == expected
    fastest = min(r["results"], key=lambda x: x["p50_ms"])
    assert (r["backend"], r["precision"], r["p50_ms"]) == (fastest["backend"], fastest["precision"], fastest["p50_ms"])
    assert r["fastest"] == {"backend": fastest["backend"], "precision": fastest["precision"]}
    for x in r["results"]:
        for k in KEYS:
            if k != "context":
                assert k in x, k
        assert x["runs"] == 8


def test_profile_all_skips_what_cannot_run(tiny, monkeypatch):
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "avx2")
    r = pf.profile_all(tiny, backends=["all"], precisions=["fp32", "bf16"], threads=1, warmup=0, runs=3)
    assert {x["precision"] for x in r["results"]} == {"fp32"}
    reasons = {(s["backend"], s["precision"]): s["reason"] for s in r["skipped"]}
    assert "no bf16" in reasons[("ort", "bf16")]
    if HAVE_OV:
        assert "AVX512_BF16 or AMX" in reasons[("openvino", "bf16")]
    with pytest.raises(UserInputError, match="no backend/precision can run this model"):
        pf.profile_all(tiny, precisions=["bf16"], threads=1, warmup=0, runs=3)


def test_profile_all_without_openvino(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # the extra is not installed
    r = pf.profile_model(tiny, threads=1, warmup=0, runs=3, backend="all")
    assert [(x["backend"], x["precision"]) for x in r["results"]] == [("ort", "fp32")]
    assert r["skipped"][0]["backend"] == "openvino" and "not installed" in r["skipped"][0]["reason"]
    assert pf.profile_model(tiny, threads=1, warmup=0, runs=3, backend="auto")["backend"] == "ort"


@pytest.mark.skipif(not HAVE_OV, reason="OpenVINO is not installed")
def test_profile_openvino(tiny, tmp_path):
    r = pf.profile_model(tiny, threads=1, warmup=1, runs=5, backend="openvino", precision="fp32", cache_dir=tmp_path / "c")
    assert (r["backend"], r["precision"]) == ("openvino", "fp32")
    assert r["backend_info"]["cache_dir"] == str(tmp_path / "c") and r["backend_info"]["inference_precision"] == "f32"


# ---------------------------------------------------------------- packages


@pytest.fixture
def package(tiny, tmp_path):
    from prune_pack.agent import keys, writer
    priv, pub = keys.generate_keypair(tmp_path / "keys")
    out = writer.write_package(tiny, {"name": "tiny", "version": 1, "precision": "fp32"}, tmp_path / "tiny.ppk",
                            signing_key=priv, registry=tmp_path / "reg")
    return out, pub


def test_profile_package_from_a_verified_copy(package, tiny, tmp_path, monkeypatch):
    path, pub = package
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    r = pf.profile_model(path, threads=1, warmup=0, runs=3, trusted_keys=[pub])
    assert r["model_sha256"] == hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert r["model"]["source"] == "package" and r["model"]["name"] == "tiny" and r["model"]["signed"] is True
    assert r["validated"] is True
    assert list((tmp_path / "tmp").iterdir()) == [], "the staging copy is removed afterwards"


def test_profile_package_rejects_an_untrusted_one(package, tmp_path):
    path, _ = package
    from prune_pack.agent import keys, writer
    _, other = keys.generate_keypair(tmp_path / "other")
    with pytest.raises(PackageRejected):
        pf.profile_model(path, threads=1, warmup=0, runs=2, trusted_keys=[other])


# ---------------------------------------------------------------- CLI


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_json(tiny, capsys):
    code, out, err = _cli(capsys, "profile", str(tiny), "--runs", "5", "--warmup", "1", "--threads", "1", "--json")
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    for k in KEYS:
        assert k in r, k
    assert r["runs"] == 5 and r["threads"] == 1 and "latencies_ms" not in r
    code, out, _ = _cli(capsys, "profile", str(tiny), "--runs", "4", "--warmup", "0", "--json", "--latencies")
    assert len(json.loads(out.strip().splitlines()[-1])["latencies_ms"]) == 4
    code, out, _ = _cli(capsys, "profile", str(tiny), "--runs", "3", "--warmup", "0", "--backend", "all", "--json")
    r = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and r["results"] and r["p50_ms"] == min(x["p50_ms"] for x in r["results"])
    for x in r["results"]:
        assert {"backend", "precision", "p50_ms", "p99_ms", "model_sha256"} <= set(x) and "latencies_ms" not in x


def test_cli_flags_override_config(tiny, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("profile:\n  runs: 7\n  warmup: 0\n  threads: 1\n")
    code, out, err = _cli(capsys, "profile", str(tiny), "--config", str(cfg), "--json")
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert (r["runs"], r["warmup"], r["threads"]) == (7, 0, 1)
    code, out, _ = _cli(capsys, "profile", str(tiny), "--config", str(cfg), "--runs", "3", "--json")
    assert json.loads(out.strip().splitlines()[-1])["runs"] == 3


def test_profile_kwargs_from_config(tmp_path):
    """The CLI and the daemon build profile_model's arguments the same way from one config."""
    from prune_pack.config import parse_config

    state = tmp_path / "state"
    state.mkdir()
    cfg = parse_config(f"agent:\n  state_dir: {state}\n  trusted_keys: [k.pub]\nprofile:\n  seconds: 5\n  backend: all\n  threads: 1\n")
    kw = pf.profile_kwargs(cfg)
    assert (kw["seconds"], kw["backend"], kw["threads"], kw["trusted_keys"]) == (5.0, "all", 1, ["k.pub"])
    assert kw["cache_dir"] == state / "cache" / "openvino"  # an existing state dir holds OpenVINO's blobs
    kw = pf.profile_kwargs(cfg, runs=9, threads=None)
    assert (kw["runs"], kw["seconds"], kw["threads"]) == (9, None, 1)  # an explicit run count wins over seconds
    assert pf.profile_kwargs(parse_config(f"agent:\n  state_dir: {tmp_path / 'absent'}\n"))["cache_dir"] is None


def test_precision_all(tiny, monkeypatch):
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "avx512_bf16")
    r = pf.profile_model(tiny, threads=1, warmup=0, runs=2, backend="openvino" if HAVE_OV else "ort", precision="all")
    got = {x["precision"] for x in r["results"]}
    assert got == ({"fp32", "bf16"} if HAVE_OV else {"fp32"})


def test_cli_table(tiny, capsys):
    code, out, _ = _cli(capsys, "profile", str(tiny), "--runs", "3", "--warmup", "0", "--backend", "all")
    assert code == 0
    assert out.splitlines()[0].split()[:4] == ["backend", "prec", "p50", "p90"]
    assert "ort" in out and "model sha256" in out


def test_cli_errors_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    code, out, err = _cli(capsys, "profile", str(tmp_path / "missing.onnx"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "model not found" in err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    code, out, err = _cli(capsys, "profile", str(bad))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot load" in err
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "avx2")
    code, _, err = _cli(capsys, "profile", str(tiny), "--precision", "bf16", "--backend", "ort")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bf16" in err


# ---------------------------------------------------------------- own packages on the host (#19)


def _fresh_home_cli(home, *argv: str):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CONFIG_HOME", "PRUNE_PACK_CONFIG")}
    env["HOME"] = str(home)
    code = "import sys\nfrom prune_pack.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=home,
                          timeout=300)


def test_own_package_profiles_and_verifies_without_flags_in_a_fresh_home(tiny, tmp_path):
    """A package signed with the user's default key (created by ensure_default_key, as the build
    does) is trusted by ``profile`` and ``verify`` with no --pubkey; a bare .onnx needs no key."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    env["HOME"] = str(home)
    write = ("import sys; from prune_pack.agent.keys import ensure_default_key; from prune_pack.agent.writer import write_package\n"
             "key, created = ensure_default_key(); assert created\n"
             "write_package(sys.argv[1], {'name': 'tiny', 'precision': 'fp32', 'version': 1}, sys.argv[2], key)")
    pkg = home / "tiny.ppk"
    r = subprocess.run([sys.executable, "-c", write, str(tiny), str(pkg)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (home / ".config" / "prune-pack" / "signing.pub").is_file()
    r = _fresh_home_cli(home, "profile", str(pkg), "--runs", "3", "--warmup", "0", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model"]["signed"] is True and out["runs"] == 3
    r = _fresh_home_cli(home, "verify", str(pkg), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["signed"] is True, r.stderr
    other = tmp_path / "other"
    other.mkdir()  # another user's HOME: the same package is not trusted there
    r = _fresh_home_cli(other, "profile", str(pkg), "--runs", "2")
    assert r.returncode == 4 and "untrusted_key" in r.stderr
    r = _fresh_home_cli(other, "profile", str(tiny), "--runs", "2", "--warmup", "0", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr


def test_unsigned_package_needs_allow_unsigned_on_the_host(tiny, tmp_path):
    from prune_pack.agent.writer import write_package

    home = tmp_path / "home"
    home.mkdir()
    pkg = write_package(tiny, {"name": "tiny", "precision": "fp32", "version": 1}, tmp_path / "u.ppk", None)
    for cmd in ("profile", "verify"):
        r = _fresh_home_cli(home, cmd, str(pkg))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 4 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "unsigned" in lines[0] and "--allow-unsigned" in lines[0]
    r = _fresh_home_cli(home, "profile", str(pkg), "--allow-unsigned", "--runs", "2", "--warmup", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["model"]["signed"] is False
