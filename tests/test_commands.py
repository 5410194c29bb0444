"""The command registry (agent/commands.py) against the request schema (agent/schemas/cmd-request.json):
every declared command has its schema entry and vice versa, with the same fields, JSON types,
limits and required set; requests built from the declaration validate, broken ones do not."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator, ValidationError

from test_mqtt_helpers import SCHEMA_DIR

import prune_pack.agent.daemon  # noqa: F401 - declares the daemon's commands
from prune_pack.agent.commands import COMMON_FIELDS, FAST, REGISTRY, SLOW, Arg, CommandError, command, load_all

DOC = json.loads((SCHEMA_DIR / "cmd-request.json").read_text())
DEFS = DOC["$defs"]
SCHEMA_COMMANDS = {k for k in DEFS if k not in ("request_id", "auth") and not k.startswith("field_")}


def _field(ref: dict) -> dict:
    return DEFS[ref["$ref"].split("/")[-1]]


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({**DOC, "$ref": f"#/$defs/{name}", "anyOf": [{}]})


def test_every_declared_command_has_its_schema_and_vice_versa() -> None:
    load_all()
    Draft202012Validator.check_schema(DOC)
    assert set(REGISTRY) == SCHEMA_COMMANDS
    assert {r["$ref"].split("/")[-1] for r in DOC["anyOf"]} == SCHEMA_COMMANDS
    assert {"ping", "status", "list-models", "deploy", "activate", "rollback", "profile"} <= set(REGISTRY)
    for name, cmd in REGISTRY.items():
        sch = DEFS[name]
        assert cmd.lane in (FAST, SLOW)
        assert set(sch["properties"]) == set(cmd.args) | set(COMMON_FIELDS), name
        assert set(sch["required"]) == {k for k, a in cmd.args.items() if a.required} | {"request_id"}, name
        assert sch["additionalProperties"] is False
        for key, arg in cmd.args.items():
            f = _field(sch["properties"][key])
            assert f["type"] == arg.type, (name, key)
            assert f.get("minimum") == arg.minimum and f.get("maximum") == arg.maximum, (name, key)
            assert f.get("minLength") == arg.min_length and f.get("maxLength") == arg.max_length, (name, key)
        exclusive = {tuple(sorted(x["required"])) for x in sch.get("not", {}).get("anyOf", [])}
        want = {tuple(sorted((a, b))) for i, a in enumerate(cmd.one_of) for b in cmd.one_of[i + 1:]}
        assert exclusive == want, name
        assert {x["required"][0] for x in sch.get("anyOf", [])} == (set(cmd.one_of) if cmd.one_required else set())


def _example(cmd_args: dict[str, Arg], one_of: tuple[str, ...]) -> dict:
    values = {"string": "x" * 8, "boolean": True, "integer": 1, "number": 1.5}
    out = {"request_id": "r1"}
    for k, a in cmd_args.items():
        if a.required or (one_of and k == one_of[0]):
            out[k] = "file:///p.ppk" if k == "url" else values[a.type]
    return out


@pytest.mark.parametrize("name", sorted(SCHEMA_COMMANDS))
def test_declaration_and_schema_accept_and_refuse_the_same_requests(name: str) -> None:
    cmd = REGISTRY[name]
    v = _validator(name)
    good = _example(cmd.args, cmd.one_of if cmd.one_required else ())
    v.validate(good)
    cmd.check({k: x for k, x in good.items() if k not in COMMON_FIELDS})
    bad_requests = [{**good, "bogus": 1}, {k: x for k, x in good.items() if k != "request_id"}]
    v.validate({**good, "auth": {"key_id": "0" * 16, "device": "lab/dev1", "expires_ms": 1, "nonce": "0" * 32, "sig": "x"}})
    for k, a in cmd.args.items():
        bad_requests.append({**good, k: None})  # wrong type
        if a.maximum is not None:
            bad_requests.append({**good, k: a.maximum + 1})
        if a.required:
            bad_requests.append({x: y for x, y in good.items() if x != k})
    if len(cmd.one_of) > 1:
        bad_requests.append({**good, cmd.one_of[0]: "a", cmd.one_of[1]: "b"})
    for bad in bad_requests:
        with pytest.raises(ValidationError):
            v.validate(bad)
        if "request_id" in bad:
            with pytest.raises(CommandError) as e:
                cmd.check({k: x for k, x in bad.items() if k not in COMMON_FIELDS})
            assert e.value.reason == "bad_request"


def test_a_command_is_declared_once() -> None:
    def first(daemon, args):  # noqa: ANN001
        return {}

    def second(daemon, args):  # noqa: ANN001
        return {}

    command("test-only", FAST)(first)
    try:
        with pytest.raises(ValueError, match="declared twice"):
            command("test-only", SLOW)(second)
        with pytest.raises(ValueError):
            command("test-bad", "medium")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            command("test-bad", FAST, args={"request_id": Arg("string")})
    finally:
        REGISTRY.pop("test-only", None)
