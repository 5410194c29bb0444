"""Error types shared by every layer (a leaf module: imports nothing from the project)."""

from __future__ import annotations


class PrunePackError(Exception):
    """An error the user can act on: printed as one line, exit code ``exit_code``."""

    exit_code = 1


class ReasonedError(PrunePackError):
    """An error with a stable machine-readable ``reason`` code (sent in MQTT answers) and a detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(self.message(reason, detail))

    @staticmethod
    def message(reason: str, detail: str) -> str:
        return f"{reason}: {detail}" if detail else reason


class UserInputError(PrunePackError):
    """Bad input: a missing file, a wrong flag value, an invalid config."""

    exit_code = 2


class ConfigError(UserInputError):
    """A configuration file that does not match the schema."""


class OfflineError(UserInputError):
    """Something would have to be downloaded, and this machine cannot or must not."""


class MissingExtraError(PrunePackError):
    """A host-only feature was used on a device install."""

    exit_code = 3

    def __init__(self, feature: str, extra: str = "host", module: str = "torch") -> None:
        super().__init__(
            f"{feature} needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'prune-pack[{extra}]'"
        )


class PackageRejected(ReasonedError):
    """A deployment package failed verification; ``reason`` is a stable machine-readable code."""

    exit_code = 4

    @staticmethod
    def message(reason: str, detail: str) -> str:
        return f"package rejected: {reason}" + (f" ({detail})" if detail else "")


class TargetUnreachable(PrunePackError):
    """The build could not meet its latency target."""

    exit_code = 5


class ParityError(PrunePackError):
    """The exported ONNX model does not compute what the PyTorch model computes."""

    exit_code = 6


class AccuracyGateError(PrunePackError):
    """A quantized (or other-precision) model lost more accuracy than allowed; it must not ship."""

    exit_code = 7


class DeviceUnavailable(PrunePackError):
    """The device is not online (lost, offline, never seen) or did not answer in time."""

    exit_code = 8
