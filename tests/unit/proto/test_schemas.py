"""The committed JSON Schemas must match the code (run ``python -m proto.schema_gen``)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given

from proto import binding, events
from proto.schema_gen import SCHEMA_DIR, render

from .strategies import event_objects


def test_committed_schemas_match_the_code() -> None:
    wanted = render()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in SCHEMA_DIR.glob("*.json")}
    assert sorted(on_disk) == sorted(wanted), "event types and schema files differ"
    drifted = [name for name, text in wanted.items() if on_disk[name] != text]
    assert not drifted, f"schemas drifted, run `python -m proto.schema_gen`: {drifted}"


def _validate(schema: dict[str, Any], defs: dict[str, Any], value: Any) -> None:
    """A small structural check of a value against msgspec's generated schema."""
    if "$ref" in schema:
        _validate(defs[schema["$ref"].rsplit("/", 1)[1]], defs, value)
        return
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                _validate(option, defs, value)
                return
            except AssertionError as e:
                errors.append(e)
        raise AssertionError(f"{value!r} matches none of {schema['anyOf']}: {errors}")
    t = schema.get("type")
    if t == "object":
        assert isinstance(value, dict)
        for key in schema.get("required", []):
            assert key in value, f"missing {key}"
        for key, item in value.items():
            if key in schema.get("properties", {}):
                _validate(schema["properties"][key], defs, item)
    elif t == "array":
        assert isinstance(value, list)
        for item in value:
            _validate(schema.get("items", {}), defs, item)
    elif t == "string":
        assert isinstance(value, str)
    elif t == "integer":
        assert isinstance(value, int)
        assert not isinstance(value, bool)
    elif t == "boolean":
        assert isinstance(value, bool)
    elif t == "null":
        assert value is None
    if "enum" in schema:
        assert value in schema["enum"]


@given(event_objects)
def test_encoded_payloads_satisfy_their_schema(event: events.AnyEvent) -> None:
    schema = json.loads((SCHEMA_DIR / f"{event.type}.json").read_text(encoding="utf-8"))
    body = json.loads(binding.to_nats(event).data)
    _validate(schema, schema.get("$defs", {}), body)
