"""The one command-line entry point: ``prune-pack``.

Host-only modules (torch, ultralytics) are imported lazily, so that ``prune-pack profile``
and ``prune-pack agent run`` work on a device install. Every handler returns a dict: printed
as one JSON object with ``--json`` (then the only stdout line: library output goes to stderr), as
``key: value`` lines otherwise.
Errors are one line on stderr and a non-zero exit; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

from prune_pack import __version__
from prune_pack.errors import MissingExtraError, PrunePackError

# command -> (module, function, host-only?)
HANDLERS: dict[str, tuple[str, str, bool]] = {
    "build": ("prune_pack.deploy.build", "cli_build", True),
    "prune": ("prune_pack.pruning.prune", "cli_prune", True),
    "finetune": ("prune_pack.pruning.recover", "cli_finetune", True),
    "val": ("prune_pack.pruning.validate", "cli_val", True),
    "export": ("prune_pack.deploy.export", "cli_export", True),
    "verify": ("prune_pack.agent.verifier", "cli_verify", False),
    "keys init": ("prune_pack.agent.keys", "cli_keys_init", False),
    "profile": ("prune_pack.agent.profiler", "cli_profile", False),
    "deploy": ("prune_pack.deploy.remote", "cli_deploy", False),
    "devices": ("prune_pack.deploy.remote", "cli_devices", False),
    "rollout": ("prune_pack.deploy.rollout", "cli_rollout", False),
    "agent run": ("prune_pack.agent.daemon", "cli_agent_run", False),
    "frames pull": ("prune_pack.deploy.frames", "cli_frames_pull", False),
    "frames stats": ("prune_pack.deploy.frames", "cli_frames_stats", False),
    "exporter": ("prune_pack.deploy.exporter", "cli_exporter", False),
    "dashboard": ("prune_pack.deploy.dashboard", "cli_dashboard", False),
    "config check": ("prune_pack.cli", "cli_config_check", False),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common(json_flag: bool = True, config: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as one JSON object, the only line on stdout")
    if config:
        p.add_argument("--config", metavar="FILE", help="configuration file (see config.example.yaml)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--verbose", action="store_true", help="show the libraries' own output (Ultralytics, ONNX export) on stderr")
    return p


UNLABELED_HELP = ("folder of unlabeled frames of the deployment scene (JPEG/PNG; e.g. harvested by the agent): "
                  "they feed pruning calibration, INT8 calibration and distillation; the val split stays the accuracy gate")
TRAIN_DEVICE_HELP = "where recovery trains: auto (CUDA when torch sees it; default), cpu, cuda or cuda:N"


def build_parser() -> argparse.ArgumentParser:
    root = _Parser(prog="prune-pack", description="Prune YOLOv8 detectors to a latency target, pack them signed, and run them on industrial PCs.")
    root.add_argument("--version", action="version", version=f"prune-pack {__version__}")
    sub = root.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _common()

    _model_commands(sub, common)
    _package_commands(sub, common)
    _fleet_commands(sub, common)

    c = sub.add_parser("config", help="configuration files")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    cc = csub.add_parser("check", parents=[_common(config=False)], help="validate a configuration file")
    cc.add_argument("file", metavar="FILE")
    return root


def _model_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """build, prune, finetune, val, export: the model side."""
    b = sub.add_parser("build", parents=[common], help="prune, fine-tune, export and package to meet a latency target on the device")
    b.add_argument("--model", metavar="PT", help="Ultralytics .pt detection model (default: the built-in demo model)")
    b.add_argument("--data", metavar="YAML", help="dataset yaml (default: the built-in demo dataset)")
    b.add_argument("--target-ms", metavar="MS|Fx", help="latency target: milliseconds (40), or a fraction of the unpruned "
                   "model's latency measured on the device (0.7x = 30 %% faster); default: build.target_ms in --config")
    b.add_argument("--max-map-drop", type=float, dest="max_map_drop", metavar="POINTS",
                   help="accuracy floor: never package a model more than this many points mAP50-95 below the unpruned one (default 3)")
    b.add_argument("--percentile", choices=["p50", "p90", "p95", "p99"], help="latency percentile the target applies to (default p95)")
    b.add_argument("--imgsz", type=int, help="input size (default 640; the built-in demo: 896)")
    b.add_argument("--threads", type=int, help="inference threads on the device (default 2)")
    b.add_argument("--epochs", type=int, help="fine-tuning epochs at the chosen point (default 10; the built-in demo: 1)")
    b.add_argument("--criterion", help="channel importance criterion (default: the measured best)")
    b.add_argument("--precision", choices=["auto", "fp32", "int8", "bf16"], help="precision search space; auto (default) tries runtime/precision changes that pass the accuracy gate before pruning")
    b.add_argument("--backend", choices=["auto", "ort", "openvino"], help="runtime on the device; auto (default): ONNX Runtime and, where installed, OpenVINO (a remote device: ONNX Runtime)")
    b.add_argument("--int8", action="store_true", help="shorthand for --precision int8")
    b.add_argument("--device", help="'local' (default) or a device id reached over MQTT")
    b.add_argument("--broker", metavar="URL", help="MQTT broker URL for a remote device (overrides the config)")
    b.add_argument("--sign", metavar="KEYFILE", help="Ed25519 private key (default: the user's key, created on first use)")
    b.add_argument("--resume", action="store_true", help="continue an interrupted build in --out")
    b.add_argument("--out", metavar="DIR", help="output folder (default ./build)")
    b.add_argument("--unlabeled", metavar="DIR", help=UNLABELED_HELP)
    b.add_argument("--train-device", dest="train_device", metavar="DEV", help=TRAIN_DEVICE_HELP)

    p = sub.add_parser("prune", parents=[common], help="remove whole channels from a detection model")
    p.add_argument("--model", metavar="PT", required=True)
    p.add_argument("--ratio", type=float, required=True, help="fraction of prunable output channels to remove, before rounding")
    p.add_argument("--criterion", help="l1, l2, bn_scale, taylor, act_var, lsq (default: the measured best, lsq)")
    p.add_argument("--data", metavar="YAML", help="calibration data for data-aware criteria and bias compensation")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--allocation", choices=["uniform", "global", "sensitivity"], help="how the ratio is spread over layers (default: sensitivity)")
    p.add_argument("--compensation", choices=["lsq", "mean", "none"], help="how consumers make up for removed channels: least-squares refit (default), mean folded into the bias, or nothing")
    p.add_argument("--unlabeled", metavar="DIR", help=UNLABELED_HELP)
    p.add_argument("--out", metavar="PT", required=True)

    f = sub.add_parser("finetune", parents=[common], help="fine-tune a (pruned) model to win accuracy back")
    f.add_argument("--model", metavar="PT", required=True)
    f.add_argument("--data", metavar="YAML", required=True)
    f.add_argument("--method", choices=["auto", "labels", "distill"],
                   help="labels: Ultralytics' supervised trainer; distill: match the unpruned teacher's outputs on the train "
                        "images or the --unlabeled frames (no labels read); auto (default): distill when the model keeps the teacher's classes")
    f.add_argument("--epochs", type=int, help="passes over the train split (default: the config's finetune.epochs)")
    f.add_argument("--imgsz", type=int, default=640)
    f.add_argument("--batch", type=int, help="batch size (default: the method's, labels 16, distill 8 on the CPU / 32 on CUDA)")
    f.add_argument("--lr0", type=float, help="initial learning rate (default: the method's, labels SGD 0.002, distill AdamW 3e-4)")
    f.add_argument("--teacher", metavar="PT", help="the unpruned model to distil from (default for --method distill: the base model the pruner recorded)")
    f.add_argument("--distill-weight", type=float, dest="distill_weight", help="distillation strength; 1.0 = Ultralytics' default (dis=6)")
    f.add_argument("--time-budget-min", type=float, dest="time_budget_min", help="stop training after this many minutes (epochs are re-estimated)")
    f.add_argument("--unlabeled", metavar="DIR", help=UNLABELED_HELP)
    f.add_argument("--train-device", dest="train_device", metavar="DEV", help=TRAIN_DEVICE_HELP)
    f.add_argument("--workers", type=int, help="parallel image loaders (default: the config's finetune.workers, 2)")
    f.add_argument("--project", metavar="DIR", help="keep Ultralytics' run folder here (default: a temporary folder, removed)")
    f.add_argument("--out", metavar="PT", required=True)

    v = sub.add_parser("val", parents=[common], help="mAP of a .pt or .onnx model on a dataset's val split")
    v.add_argument("--model", metavar="PT|ONNX", required=True)
    v.add_argument("--data", metavar="YAML", required=True)
    v.add_argument("--imgsz", type=int, default=640)
    v.add_argument("--batch", type=int, help="batch size for .pt (default 1: Ultralytics' NMS time limit per batch cuts large batches short on a loaded CPU)")

    e = sub.add_parser("export", parents=[common], help="export to ONNX (optionally INT8) with a parity check, and pack")
    e.add_argument("--model", metavar="PT", required=True)
    e.add_argument("--imgsz", help="input size: 640 (square, the default) or WIDTHxHEIGHT, e.g. 640x384 for a 16:9 camera")
    e.add_argument("--int8", action="store_true", help="static INT8 quantization (needs --data for calibration and the accuracy gate)")
    e.add_argument("--data", metavar="YAML")
    e.add_argument("--dynamic", action="store_true", help="dynamic batch dimension")
    e.add_argument("--max-map-drop", type=float, dest="max_map_drop", metavar="POINTS",
                   help="refuse INT8 when mAP50-95 falls more than this many points below FP32 (default 1.0)")
    e.add_argument("--calib-images", type=int, dest="calib_images", help="INT8 calibration images from the train split (default: 32 for the ORT quantizer, 128 for NNCF)")
    e.add_argument("--unlabeled", metavar="DIR", help="with --int8: calibrate on these frames of the deployment scene instead of the train split")
    e.add_argument("--sign", metavar="KEYFILE", help="Ed25519 private key to sign the package")
    e.add_argument("--name", help="model name in the manifest (default: the checkpoint's stem)")
    e.add_argument("--version-number", type=int, dest="version_number", help="manifest version (default: next for this name)")
    e.add_argument("--out", metavar="PACKAGE", required=True, help="package file to write (.ppk), or .onnx for the bare model")


def _package_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """verify, keys, profile, deploy: packages on this machine or one device."""
    ver = sub.add_parser("verify", parents=[_common(config=True)], help="verify a package's hashes and signature")
    ver.add_argument("package", metavar="PACKAGE")
    ver.add_argument("--pubkey", metavar="FILE", action="append", help="trusted public key (repeatable)")
    ver.add_argument("--allow-unsigned", action="store_true", help="accept a package without signature (development only)")

    k = sub.add_parser("keys", help="signing keys")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)
    ki = ksub.add_parser("init", parents=[_common(config=False)], help="create an Ed25519 key pair")
    ki.add_argument("--out", metavar="DIR", required=True, help="writes DIR/signing.key (0600) and DIR/signing.pub")
    ki.add_argument("--force", action="store_true", help="overwrite an existing key pair")

    pr = sub.add_parser("profile", parents=[common], help="measure latency and memory of a model or package on this machine")
    pr.add_argument("model", metavar="MODEL.onnx|PACKAGE")
    pr.add_argument("--threads", type=int, help="intra-op threads (default 2; 0 = runtime default)")
    pr.add_argument("--warmup", type=int, help="warm-up runs, excluded (default 10)")
    g = pr.add_mutually_exclusive_group()
    g.add_argument("--runs", type=int, help="measured runs (default 100)")
    g.add_argument("--seconds", type=float, help="measure for this long instead")
    pr.add_argument("--backend", choices=["ort", "openvino", "all"], help="runtime(s) to measure (default ort; all = every installed one)")
    pr.add_argument("--precision", help="fp32, bf16 (OpenVINO, CPUs with AVX512_BF16/AMX) or int8 (a quantized file); comma-separated for several (default: the model's own)")
    pr.add_argument("--images", metavar="DIR", help="feed real preprocessed images from this folder instead of random tensors")
    pr.add_argument("--pubkey", metavar="FILE", action="append", help="trusted public key for a signed package (repeatable)")
    pr.add_argument("--allow-unsigned", action="store_true", help="accept a package without signature (development only)")
    pr.add_argument("--latencies", action="store_true", help="include every measured latency (latencies_ms) in the result")

    d = sub.add_parser("deploy", parents=[common], help="send a package to a device over MQTT and activate it")
    d.add_argument("package", metavar="PACKAGE")
    d.add_argument("--device", required=True, help="device id")
    d.add_argument("--broker", metavar="URL", help="MQTT broker URL (overrides the config)")
    d.add_argument("--force", action="store_true", help="allow an older version than the active one")
    d.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the device's answer")


def _fleet_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """devices, rollout, exporter, dashboard, agent, frames: the fleet over MQTT."""
    dv = sub.add_parser("devices", parents=[common], help="the fleet as the retained status topics show it")
    dv.add_argument("--broker", metavar="URL", help="MQTT broker URL (overrides the config)")
    dv.add_argument("--wait", type=float, default=2.0, help="seconds to collect retained messages")

    ro = sub.add_parser("rollout", parents=[common], help="roll a package out to many devices: canary, batches, latency gate, rollback",
                        description="prune-pack rollout PACKAGE --devices SELECTOR | status [ID] | abort ID | resume ID")
    ro.add_argument("what", metavar="PACKAGE|status|abort|resume")
    ro.add_argument("rid", nargs="?", metavar="ID", help="rollout id (status, abort, resume)")
    ro.add_argument("--devices", metavar="SELECTOR", help="comma-separated: globs on site/id or id (line1/*), @FILE of ids, KEY=GLOB filters (model, version, sha256, agent, site, state)")
    ro.add_argument("--canary", type=int, help="devices updated and gated first (default 1)")
    ro.add_argument("--batch", metavar="N|P%", help="devices per batch after the canary (default 10%%)")
    ro.add_argument("--max-failures", dest="max_failures", metavar="N|P%", help="failures tolerated before stopping and rolling back (default 0)")
    ro.add_argument("--gate", metavar="p95<=MS", help="live latency gate (default: the package's target)")
    ro.add_argument("--soak", type=float, metavar="S", help="seconds each updated device must stay within the gate (default 60)")
    ro.add_argument("--parallel", type=int, help="devices updated at once (default 16)")
    ro.add_argument("--package-url", dest="package_url", metavar="URL", help="devices fetch the package from this http(s):// or file:// URL (the same file as PACKAGE) instead of receiving it inline")
    ro.add_argument("--dry-run", dest="dry_run", action="store_true", help="show the waves and the offline devices; touch nothing")
    ro.add_argument("--broker", metavar="URL", help="MQTT broker URL (overrides the config)")
    ro.add_argument("--wait", type=float, default=3.0, help="at most this many seconds to collect the retained statuses")

    ex = sub.add_parser("exporter", parents=[common], help="one Prometheus /metrics for the fleet, fed by MQTT")
    ex.add_argument("--broker", metavar="URL", help="MQTT broker URL (overrides the config)")
    ex.add_argument("--listen", metavar="HOST:PORT", help="where /metrics is served (exporter.listen, default 127.0.0.1:9108)")

    db = sub.add_parser("dashboard", parents=[common], help="a live fleet page in the browser, fed by MQTT")
    db.add_argument("--broker", metavar="URL", help="MQTT broker URL (overrides the config)")
    db.add_argument("--listen", metavar="HOST:PORT", help="where the page is served (dashboard.listen, default 127.0.0.1:8108)")

    a = sub.add_parser("agent", help="the device daemon")
    asub = a.add_subparsers(dest="agent_command", metavar="ACTION", parser_class=_Parser)
    ar = asub.add_parser("run", parents=[_common(json_flag=False, config=False)], help="run the daemon")
    ar.add_argument("--config", metavar="FILE", required=True)

    fr = sub.add_parser("frames", help="frames harvested on devices (streams[].harvest), for recovery with --unlabeled")
    fsub = fr.add_subparsers(dest="frames_command", metavar="ACTION", parser_class=_Parser)
    fp = fsub.add_parser("pull", parents=[common], help="copy a device's harvested frames here over MQTT (resumable)")
    fp.add_argument("--device", required=True, help="device id (or site/device)")
    fp.add_argument("--out", metavar="DIR", required=True, help="frames folder (frames already there and verified are skipped)")
    fp.add_argument("--max", type=int, help="fetch at most this many frames in this run (oldest first)")
    fp.add_argument("--since", metavar="T", help="only frames kept since T: ISO time (UTC), epoch seconds, or an age like 12h, 7d")
    fp.add_argument("--broker", metavar="URL", help="MQTT broker URL (overrides the config)")
    fp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    fp.add_argument("--retry-s", type=float, default=120.0, dest="retry_s",
                    help="keep reconnecting this long after a drop before giving up (a rerun resumes)")
    fs = fsub.add_parser("stats", parents=[common], help="count the frames in a folder, or in a device's pool")
    fs.add_argument("dir", metavar="DIR", nargs="?", help="frames folder (pulled or copied by hand)")
    fs.add_argument("--device", help="device id: its pool's state instead of a folder")
    fs.add_argument("--broker", metavar="URL", help="MQTT broker URL (overrides the config)")
    fs.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the device's answer")

def _command_key(args: argparse.Namespace) -> Optional[str]:
    cmd = args.command
    if cmd in ("keys", "agent", "config", "frames"):
        action = getattr(args, f"{cmd}_command", None)
        return f"{cmd} {action}" if action else None
    return cmd


def _handler(key: str) -> Callable[[argparse.Namespace, Any], Optional[dict]]:
    module, func, host_only = HANDLERS[key]
    if host_only:
        for dep in ("torch", "ultralytics"):
            if importlib.util.find_spec(dep) is None:
                raise MissingExtraError(f"prune-pack {key}", "host", dep)
        import prune_pack.offline  # noqa: F401 - Ultralytics must never try the network on its own
    return getattr(importlib.import_module(module), func)


def cli_config_check(args: argparse.Namespace, cfg: Any) -> dict:
    from prune_pack.config import load_config

    loaded = load_config(args.file)
    return {"ok": True, "file": args.file, "streams": len(loaded.streams), "summary": f"{args.file}: OK"}


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str, sort_keys=False))
        return
    if "summary" in result:
        print(result["summary"])
        return
    for k, v in result.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        print(f"{k}: {v}")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """stdout carries the result only (with --json, one JSON object): everything the libraries print on the way
    (Ultralytics' exporter and trainer log to a handler bound to the original stdout, native code
    writes to fd 1) goes to stderr, at the file-descriptor level."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    key = _command_key(args)
    if key is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    try:
        cfg = None
        if key != "config check":
            from prune_pack.config import load_config

            cfg = load_config(getattr(args, "config", None))
        as_json = getattr(args, "json", False)
        host = HANDLERS[key][2]
        if host:
            # Ultralytics reads this when first imported (the handlers import it lazily, after this);
            # set either way, so that a value left by an earlier in-process call never decides.
            os.environ["YOLO_VERBOSE"] = str(bool(getattr(args, "verbose", False)))
        # stdout carries the result only: what the libraries print on the way goes to stderr.
        with _stdout_to_stderr() if as_json or host else contextlib.nullcontext():
            result = _handler(key)(args, cfg)
        if result is not None:
            _print_result(result, getattr(args, "json", False))
        return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0
    except KeyboardInterrupt:
        print("prune-pack: interrupted", file=sys.stderr)
        return 130
    except PrunePackError as e:
        if debug:
            raise
        print(f"prune-pack: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        print(f"prune-pack: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
