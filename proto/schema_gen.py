"""Generate the committed JSON Schemas of the event payloads (``proto/schemas/``).

Run ``python -m proto.schema_gen`` after changing an event type; a test fails
while the committed files and the code disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from proto.api import REQUEST_TYPES, Reply
from proto.events import EVENT_TYPES, data_schema

SCHEMA_DIR = Path(__file__).with_name("schemas")


def render() -> dict[str, str]:
    """File name -> file text for every event type."""
    out = {
        f"{type_}.json": json.dumps(data_schema(cls), indent=2, sort_keys=True) + "\n"
        for type_, cls in sorted(EVENT_TYPES.items())
    }
    api: dict[str, type[object]] = {f"api.v1.{op}.request": c for op, c in REQUEST_TYPES.items()}
    api["api.v1.reply"] = Reply
    for name, cls in sorted(api.items()):
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": name,
            **msgspec.json.schema(cls),
        }
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main() -> int:
    SCHEMA_DIR.mkdir(exist_ok=True)
    wanted = render()
    for old in SCHEMA_DIR.glob("*.json"):
        if old.name not in wanted:
            old.unlink()
    for name, text in wanted.items():
        (SCHEMA_DIR / name).write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {len(wanted)} schemas to {SCHEMA_DIR}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
