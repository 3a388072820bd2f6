"""The pinned publish path of the JetStream adapter writes exactly what ``Client.publish``
writes, with the same refusals, against the installed nats-py."""

from __future__ import annotations

from collections.abc import Iterator

import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.adapters.jetstream import (
    JetStreamEventStore,
    fast_publish_supported,
    hpub_command,
    publish_prevalidated,
)
from eventstore.errors import EventStoreError

CASES = [
    ("twinhub.ev.o.d.resource-changed./light/1", "_INBOX.x.7", {"ce-id": "1", "a": "b"}, b"{}"),
    ("twinhub.ev.o.d.k._", "", {"Nats-Batch-Id": "ab", "Nats-Batch-Sequence": "2"}, b""),
    ("s", "r", {"ce-subject": "/caf\u00e9/\u2603 x", "Content-Type": "text/plain"}, b"x" * 99),
]


@pytest.fixture
def sent(nats_client: NatsClient) -> Iterator[list[bytes]]:
    """What the client queues for the server, captured instead of sent."""
    commands: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        commands.append(cmd)

    nats_client._send_command = capture  # type: ignore[method-assign]
    try:
        yield commands
    finally:
        del nats_client._send_command


def test_the_installed_client_supports_it(nats_client: NatsClient) -> None:
    assert fast_publish_supported(nats_client)


@pytest.mark.parametrize(("subject", "reply", "headers", "payload"), CASES)
async def test_bytes_are_those_of_client_publish(
    nats_client: NatsClient,
    sent: list[bytes],
    subject: str,
    reply: str,
    headers: dict[str, str],
    payload: bytes,
) -> None:
    await nats_client.publish(subject, payload, reply=reply, headers=headers)
    stats = dict(nats_client.stats)
    await publish_prevalidated(nats_client, subject, reply, headers, payload)
    assert sent == [sent[0], sent[0]]
    assert sent[0] == hpub_command(subject, reply, headers, payload)
    assert nats_client.stats["out_msgs"] == stats["out_msgs"] + 1
    assert nats_client.stats["out_bytes"] == stats["out_bytes"] + len(payload)


async def test_refusals_are_those_of_client_publish(nats_client: NatsClient) -> None:
    with pytest.raises(nats.errors.MaxPayloadError):
        await publish_prevalidated(
            nats_client, "s", "", {"a": "b"}, b"x" * (nats_client.max_payload + 1)
        )
    with pytest.raises(nats.errors.BadSubjectError):
        await publish_prevalidated(nats_client, "", "", {"a": "b"}, b"")


async def test_a_closed_client_refuses(nats_admin: NatsEndpoint) -> None:
    nc = await nats.connect(**nats_admin.connect_options())
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await publish_prevalidated(nc, "s", "", {"a": "b"}, b"")


class _Ack:
    headers = None

    def __init__(self, data: bytes) -> None:
        self.data = data


async def test_acks_are_decoded_and_a_malformed_one_is_an_event_store_error() -> None:
    store = JetStreamEventStore(None)
    ack = await store._pub_ack(_Ack(b'{"stream":"S","seq":7,"duplicate":true}'))  # type: ignore[arg-type]
    assert ack == {"stream": "S", "seq": 7, "duplicate": True}
    for bad in (b"{", b"[1]", b"\xff"):
        with pytest.raises(EventStoreError, match="malformed JetStream ack"):
            await store._pub_ack(_Ack(bad))  # type: ignore[arg-type]
