"""Shared fixtures: real material from ../shared (skipped with a reason when absent), a real
Mosquitto broker on 127.0.0.1 with a password file and an ACL, and small real models."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")


REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PRUNE_PACK_SHARED", REPO.parent / "shared"))
ON_CI = os.environ.get("CI") == "true"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a skip that says why (CI has it; a user's clone may not)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (the project's shared test material beside the checkout)")
    return p


@pytest.fixture(scope="session")
def coco_pt() -> Path:
    return shared_path("models", "yolov8n-coco.pt")


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def coco128_yaml(work_dir) -> Path:
    """coco128 with its relative ``path`` rewritten into a temp copy (../shared is read-only)."""
    from prune_pack.pruning.sources import resolve_dataset

    return resolve_dataset(shared_path("data", "coco128", "data.yaml"), work_dir / "data")


@pytest.fixture(scope="session")
def tiny_pt(work_dir) -> Path:
    """A random-initialised YOLOv8n-architecture detector with 3 classes, built from the yaml
    that ships inside Ultralytics (no download): for structure and shape tests."""
    pytest.importorskip("ultralytics")
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    m = YOLO("yolov8n.yaml")
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = {0: "a", 1: "b", 2: "c"}
    m.model = model
    out = work_dir / "tiny.pt"
    m.save(out)
    return out


def bus_jpg() -> Path:
    """bus.jpg as shipped inside the Ultralytics package (no download)."""
    import ultralytics

    p = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    if not p.exists():
        pytest.skip("ultralytics' bundled assets/bus.jpg is missing")
    return p


# ---------------------------------------------------------------- Mosquitto

USERS = {"device": "device-secret", "host": "host-secret", "viewer": "viewer-secret", "hass": "hass-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A real Mosquitto on 127.0.0.1: password file + ACL, never a system service."""

    def __init__(self, root: Path) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            if ON_CI:
                pytest.fail("mosquitto is not installed (.ci/run must apt-get install it)")
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self.root = root
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = dict(USERS)
        self.proc: subprocess.Popen | None = None
        passwd = root / "passwd"
        passwd.write_text("")
        for user, pw in self.users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, pw], check=True, capture_output=True)
        os.chmod(passwd, 0o600)
        acl = root / "acl"
        acl.write_text(
            "user device\ntopic readwrite prunepack/#\ntopic readwrite test/#\n"
            # Home Assistant discovery: the two lines docs/mqtt.md asks for
            "topic write homeassistant/device/+/config\ntopic read homeassistant/status\n\n"
            "user host\ntopic readwrite prunepack/#\ntopic readwrite test/#\ntopic readwrite homeassistant/#\n\n"
            "user viewer\ntopic read prunepack/#\ntopic read test/#\n\n"
            # Home Assistant's own user, as docs/mqtt.md gives it (+ mqtt_statestream's topics for the test)
            "user hass\ntopic read prunepack/#\ntopic readwrite homeassistant/#\ntopic readwrite hastate/#\n"
        )
        os.chmod(acl, 0o600)
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(
            # As root, mosquitto would drop to its own user, which cannot read our temp dir.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
            f"acl_file {acl}\npersistence false\nlog_dest file {root / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()
