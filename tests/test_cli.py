"""The command-line contract: --help everywhere, one-line errors, non-zero exits, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prune_pack.cli import HANDLERS

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None, pre: str = "") -> subprocess.CompletedProcess:
    code = f"{pre}\nimport sys\nfrom prune_pack.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(p: subprocess.CompletedProcess, *fragments: str) -> None:
    assert p.returncode != 0, p
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{p.stderr}"
    assert "Traceback" not in p.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("cmd", sorted(HANDLERS))
def test_every_subcommand_has_help(cmd):
    p = run(*cmd.split(), "--help")
    assert p.returncode == 0, p.stderr
    assert "usage: prune-pack " + cmd in p.stdout


def test_handlers_exist():
    """Every dispatch target names a real function (host ones only where the host extra is installed)."""
    import importlib
    import importlib.util

    host = importlib.util.find_spec("torch") is not None
    for key, (module, func, host_only) in HANDLERS.items():
        if host_only and not host:
            continue
        assert callable(getattr(importlib.import_module(module), func)), key


def test_unknown_flag_is_one_line():
    p = run("profile", "m.onnx", "--bogus")
    assert_one_line_error(p, "unrecognized arguments: --bogus")
    assert p.returncode == 2 and p.stdout == ""


def test_no_command_prints_help():
    p = run()
    assert p.returncode == 2 and "COMMAND" in p.stderr


def test_missing_model_file(tmp_path):
    out = tmp_path / "out.pt"
    p = run("prune", "--model", str(tmp_path / "missing.pt"), "--ratio", "0.3", "--out", str(out))
    assert_one_line_error(p, "missing.pt")
    assert not out.exists()
    p = run("profile", str(tmp_path / "missing.onnx"))
    assert_one_line_error(p, "missing.onnx")


def test_dataset_yaml_with_missing_folder(tmp_path, tiny_pt):
    data = tmp_path / "data.yaml"
    (tmp_path / "images" / "train").mkdir(parents=True)
    data.write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: a}\n")
    out = tmp_path / "ft.pt"
    p = run("finetune", "--model", str(tiny_pt), "--data", str(data), "--epochs", "1", "--out", str(out), cwd=tmp_path)
    assert_one_line_error(p, "images/val")
    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["data.yaml", "images"]


@pytest.mark.parametrize(
    "text, fragment",
    [("build:\n  imgsz: big\n", "build.imgsz: expected integer"), ("build:\n  colour: red\n", "build.colour: unknown key")],
)
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, text, fragment):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    p = run("config", "check", str(cfg))
    assert_one_line_error(p, f"bad.yaml:2: {fragment}")
    out = tmp_path / "out"
    p = run("build", "--config", str(cfg), "--target-ms", "40", "--out", str(out), cwd=tmp_path)
    assert_one_line_error(p, fragment)
    assert not out.exists()


def test_config_check_json(tmp_path):
    p = run("config", "check", str(REPO / "config.example.yaml"), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["ok"] is True


BLOCK_HOST = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'ultralytics', 'torchvision'):
            raise ImportError('blocked: device install')
sys.meta_path.insert(0, _Block())
import importlib.util
_orig = importlib.util.find_spec
def _find_spec(name, package=None):
    if name.split('.')[0] in ('torch', 'ultralytics', 'torchvision'):
        return None
    return _orig(name, package)
importlib.util.find_spec = _find_spec
"""


@pytest.mark.parametrize("cmd", ["build --target-ms 40", "prune --model m.pt --ratio 0.2 --out o.pt", "export --model m.pt --out o.ppk"])
def test_host_commands_on_device_install_say_which_extra(tmp_path, cmd):
    p = run(*cmd.split(), cwd=tmp_path, pre=BLOCK_HOST)
    assert_one_line_error(p, "pip install 'prune-pack[host]'")
    assert p.returncode == 3
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("nope: 1\n")
    p = run("config", "check", str(cfg), "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr
