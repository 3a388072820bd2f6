"""The twin's document and JSON forms."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from proto import events as ev
from twin.errors import CorruptTwinError
from twin.fold import fold_all
from twin.model import Twin, utc_ms

from .factory import T0, changed, event, link, online


def sample() -> Twin:
    twin = fold_all(
        None,
        [
            event(ev.DeviceRegistered(), 1),
            event(online("c1"), 2),
            event(ev.ResourceLinksPublished(links=(link("/light.1", "oic.r.switch.binary"),)), 3),
            event(
                changed("/light.1", {"value": True}, etag="e1", observe_seq=2, connection_id="c1"),
                4,
            ),
            event(ev.TwinSyncStateChanged(state="in_sync", connection_id="c1"), 5),
        ],
    )
    assert twin is not None
    return twin


def test_document_shape() -> None:
    doc = sample().to_document()
    assert doc == {
        "_id": "d1",
        "owner": "alice",
        "deleted": False,
        "connection": {
            "online": True,
            "since": T0 + timedelta(seconds=2),
            "gateway": "gw-1",
            "connection_id": "c1",
            "remote_address": "10.0.0.5:40122",
            "protocol": "coap+tcp",
        },
        "sync_state": "in_sync",
        "links": [{"href": "/light.1", "rt": ["oic.r.switch.binary"], "if": ["oic.if.baseline"]}],
        "resource_types": ["oic.r.switch.binary"],
        "resources": [
            {
                "href": "/light.1",
                "content": {"value": True},
                "content_format": 50,
                "raw": None,
                "status": "2.05",
                "etag": "e1",
                "observe_seq": 2,
                "connection_id": "c1",
                "updated_at": T0 + timedelta(seconds=4),
                "position": 4,
            }
        ],
        "pending": [],
        "pending_count": 0,
        "next_expiry": None,
        "recent_outcomes": [],
        "desired": [],
        "delta": [],
        "profile": "",
        "name": "",
        "token_hash": "",
        "telemetry": [],
        "client_attributes": [],
        "position": 5,
        "version": 5,
        "created_at": T0 + timedelta(seconds=1),
        "updated_at": T0 + timedelta(seconds=5),
    }
    assert Twin.from_document(doc) == sample()


def test_json_view_has_online_at_top_level_and_is_serialisable() -> None:
    view = sample().to_json()
    assert view["online"] is True
    assert view["connection"]["since"] == "2026-01-01T00:00:02.000Z"
    assert view["resources"][0]["updated_at"] == "2026-01-01T00:00:04.000Z"
    assert view["links"][0]["if"] == ["oic.if.baseline"]
    assert json.loads(json.dumps(view)) == view


def test_never_connected_twin_json() -> None:
    twin = fold_all(None, [event(ev.DeviceRegistered(), 1)])
    assert twin is not None
    view = twin.to_json()
    assert view["online"] is False
    assert view["connection"]["since"] is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("owner"),
        lambda d: d.update(position="5"),
        lambda d: d.update(sync_state="confused"),
        lambda d: d["connection"].update(online=1),
        lambda d: d["resources"][0].pop("updated_at"),
        lambda d: d["links"].append({"rt": ["no-href"]}),
        lambda d: d.update(created_at="yesterday"),
    ],
)
def test_corrupt_documents_are_refused(damage: object) -> None:
    doc = sample().to_document()
    assert callable(damage)
    damage(doc)
    with pytest.raises(CorruptTwinError):
        Twin.from_document(doc)


def test_utc_ms() -> None:
    t = datetime(2026, 5, 1, 1, 2, 3, 999999, tzinfo=UTC)
    assert utc_ms(t) == datetime(2026, 5, 1, 1, 2, 3, 999000, tzinfo=UTC)
    assert utc_ms(t).tzinfo is UTC
