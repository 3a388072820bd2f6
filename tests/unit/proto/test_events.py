from __future__ import annotations

import uuid

from proto.events import new_event_id


def test_event_ids_are_random_uuids_in_canonical_text() -> None:
    ids = [new_event_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert str(u) == text
        assert u.version == 4
        assert u.variant == uuid.RFC_4122


def test_every_variant_digit_occurs() -> None:
    assert {new_event_id()[19] for _ in range(2000)} == set("89ab")
