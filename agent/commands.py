"""The daemon's commands, each declared once: name, lane, arguments (JSON type, required, limits),
cross-field rules and handler. The daemon dispatches through ``REGISTRY``; the request schema
``agent/schemas/cmd-request.json`` has one ``$defs`` entry per command, and
tests/test_commands.py checks the two agree (every declared command has its schema and vice versa,
same fields, types, limits and required set).

How to add a command (say ``frames``):

1. Write the handler, ``def frames(daemon, args: dict) -> dict`` (a module function taking the
   ``Daemon``, or a ``Daemon`` method: both are called as ``handler(daemon, args)``). Raise
   ``CommandError(reason, detail)`` for a failure the host should see; any ``ReasonedError``
   (``PackageRejected``, ``StoreError``) is answered with its own reason.
2. Decorate it::

       @command("frames", SLOW, args={"stream": Arg("string", required=True),
                                      "count": Arg("integer", minimum=1, maximum=100)})

   ``FAST`` is for answers that take milliseconds (ping, status); anything that reads disks,
   loads models or talks to the network goes ``SLOW`` so it never delays a ping.
   ``signed=True`` for anything that changes the device or runs code on it (see docs/mqtt.md).
3. If the handler lives outside agent/daemon.py, add its module to ``COMMAND_MODULES`` below so
   the daemon imports it (this module imports nothing of the project besides errors).
4. Add ``"$defs": {"frames": ...}`` to agent/schemas/cmd-request.json (and its ``anyOf`` list);
   tests/test_commands.py tells you what is missing. Document it in docs/mqtt.md.

The argument check (``check``) runs before the handler: unknown fields, wrong JSON types, values
out of limits and missing required fields are answered ``bad_request`` and never reach a handler.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from prune_pack.errors import ReasonedError

FAST, SLOW = "fast", "slow"
Lane = Literal["fast", "slow"]
JsonType = Literal["string", "boolean", "integer", "number"]
# Modules (besides agent/daemon.py) that declare commands; the daemon imports them at start.
COMMAND_MODULES: tuple[str, ...] = ("prune_pack.agent.frames",)
# Fields every request may carry besides its arguments (auth: the command signature, agent.cmdauth).
COMMON_FIELDS = ("request_id", "auth")

_PY_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "boolean": (bool,), "integer": (int,), "number": (int, float)}


class CommandError(ReasonedError):
    """A command that fails with a stable ``reason`` (sent in the answer) and a detail."""


@dataclass(frozen=True)
class Arg:
    """One request field: its JSON type, whether it is required and its limits (inclusive)."""

    type: JsonType
    required: bool = False
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    min_length: Optional[int] = None  # strings only
    max_length: Optional[int] = None  # strings only

    def check(self, key: str, value: Any) -> None:
        types = _PY_TYPES[self.type]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise CommandError("bad_request", f"field {key!r} must be {self.type}, got {type(value).__name__}")
        if self.minimum is not None and value < self.minimum or self.maximum is not None and value > self.maximum:
            raise CommandError("bad_request", f"field {key!r} must be within [{self.minimum}, {self.maximum}], got {value}")
        if self.min_length is not None and len(value) < self.min_length:
            raise CommandError("bad_request", f"field {key!r} is shorter than {self.min_length} characters")
        if self.max_length is not None and len(value) > self.max_length:
            raise CommandError("bad_request", f"field {key!r} is longer than {self.max_length} characters")


@dataclass(frozen=True)
class Command:
    name: str
    lane: Lane
    handler: Callable[[Any, dict], Any]
    args: dict[str, Arg] = field(default_factory=dict)
    one_of: tuple[str, ...] = ()  # at most one of these fields may be given ...
    one_required: bool = False  # ... and (when True) exactly one
    # Changes the device or runs code: needs a signed request. A callable decides per request
    # (profile of the active model is open, profile of a given file is not).
    signed: bool | Callable[[dict], bool] = False

    def needs_signature(self, args: dict) -> bool:
        return bool(self.signed(args)) if callable(self.signed) else self.signed

    def check(self, args: dict) -> None:
        """Raise ``CommandError('bad_request')`` unless ``args`` (request_id and auth removed) fit."""
        for k, v in args.items():
            if k not in self.args:
                expected = ", ".join(sorted(self.args)) or "none"
                raise CommandError("bad_request", f"unknown field {k!r} for {self.name} (expected: {expected})")
            self.args[k].check(k, v)
        for k, a in self.args.items():
            if a.required and k not in args:
                raise CommandError("bad_request", f"field {k!r} is required for {self.name}")
        given = [k for k in self.one_of if k in args]
        if len(given) > 1:
            raise CommandError("bad_request", f"give one of {', '.join(self.one_of)} (got {', '.join(given)})")
        if self.one_required and not given:
            raise CommandError("bad_request", f"{self.name} needs one of {', '.join(self.one_of)}")


REGISTRY: dict[str, Command] = {}


def command(name: str, lane: Lane, *, args: Optional[dict[str, Arg]] = None, one_of: tuple[str, ...] = (),
            one_required: bool = False, signed: bool | Callable[[dict], bool] = False) -> Callable[[Callable], Callable]:
    """Declare ``name``: the decorated function is its handler, called as ``handler(daemon, args)``."""
    if lane not in (FAST, SLOW):
        raise ValueError(f"lane must be {FAST!r} or {SLOW!r}, got {lane!r}")
    spec = dict(args or {})
    clash = [k for k in spec if k in COMMON_FIELDS]
    if clash or any(k not in spec for k in one_of):
        raise ValueError(f"command {name}: bad argument declaration ({clash or one_of})")

    def register(fn: Callable) -> Callable:
        if name in REGISTRY and REGISTRY[name].handler.__qualname__ != fn.__qualname__:
            raise ValueError(f"command {name!r} is declared twice ({REGISTRY[name].handler.__qualname__}, {fn.__qualname__})")
        REGISTRY[name] = Command(name, lane, fn, spec, tuple(one_of), one_required, signed)
        return fn

    return register


def load_all() -> dict[str, Command]:
    """Import every module that declares commands (the daemon's own are declared on import of it)."""
    for mod in COMMAND_MODULES:
        importlib.import_module(mod)
    return REGISTRY


def lookup(name: str) -> Command:
    try:
        return REGISTRY[name]
    except KeyError:
        raise CommandError("unknown_command", f"{name!r} (known: {', '.join(sorted(REGISTRY))})") from None


def lane_of(name: str) -> Lane:
    """Unknown commands take the fast lane (their answer is an error)."""
    c = REGISTRY.get(name)
    return c.lane if c is not None else FAST


# Argument sets shared by several commands.
MAX_PATH = 4096
SOURCE_ARGS = {"package_b64": Arg("string"), "path": Arg("string", max_length=MAX_PATH),
               "url": Arg("string", max_length=MAX_PATH)}
SOURCES = tuple(SOURCE_ARGS)


def given_source(args: dict) -> bool:
    """A request that brings its own package (to deploy or to run)."""
    return any(k in args for k in SOURCES)
PROFILE_ARGS = {"backend": Arg("string", max_length=64), "precision": Arg("string", max_length=64),
                "threads": Arg("integer", minimum=0, maximum=256), "warmup": Arg("integer", minimum=0, maximum=1000),
                "runs": Arg("integer", minimum=1, maximum=10000), "seconds": Arg("number", minimum=0.01, maximum=600)}


def parse_request(payload: bytes) -> dict:
    """A request's JSON object with its ``request_id``; ``CommandError`` for anything else."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CommandError("bad_json", "the payload is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise CommandError("bad_request", f"the payload must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("request_id")
    if not isinstance(rid, str) or not 1 <= len(rid) <= 128:
        raise CommandError("bad_request", "request_id (a string of 1-128 characters) is required")
    return obj


def request_id_of(payload: bytes) -> Optional[str]:
    """The request_id to echo even when the rest of the request is bad."""
    try:
        return parse_request(payload)["request_id"]
    except CommandError:
        return None
