from __future__ import annotations

from collections.abc import AsyncIterator

from eventstore.memory import InMemoryEventStore
from gateway.devicestate import CommandLog, discover_owner_links, load_device_state
from proto import binding
from proto import events as ev
from proto.message import StoredMessage


def e(owner: str, device: str, data: ev.EventData) -> ev.AnyEvent:
    return ev.Event(owner=owner, device_id=device, data=data, source="/t")


def link(href: str, ins: int) -> ev.ResourceLink:
    return ev.ResourceLink(href=href, ins=ins, observable=True)


async def test_links_and_last_contents_are_replayed_from_the_log() -> None:
    store = InMemoryEventStore()
    await store.provision()
    history = [
        e("o", "d1", ev.ResourceLinksPublished(links=(link("/a", 1), link("/b", 2)))),
        e("o", "d1", ev.ResourceChanged(href="/a", content={"v": 1}, content_format=10000)),
        e("o", "d1", ev.ResourceChanged(href="/a", content={"v": 2}, content_format=10000)),
        e("o", "d1", ev.ResourceChanged(href="/b", status="4.04")),
        e("o", "d1", ev.ResourceLinksPublished(links=(link("/c", 3),))),
        e("o", "d1", ev.ResourceLinksUnpublished(instance_ids=(3,))),
        e("o", "d2", ev.ResourceLinksPublished(links=(link("/x", 1),))),
        e("o", "d3", ev.ResourceLinksPublished(links=(link("/y", 1),))),
        e("o", "d3", ev.DeviceUnregistered(reason="sign-off")),
        e("other", "d4", ev.ResourceLinksPublished(links=(link("/z", 1),))),
    ]
    for item in history:
        await store.append([binding.to_nats(item)])
    state = await load_device_state(store, "o", "d1")
    assert sorted(x.href for x in state.links) == ["/a", "/b"]
    assert state.last_content == {"/a": (10000, {"v": 2}), "/b": (None, ("status", "4.04"))}
    found = await discover_owner_links(store, "o")
    assert {d: [x.href for x in links] for d, links in found.items()} == {
        "d1": ["/a", "/b"],
        "d2": ["/x"],
    }
    assert list(await discover_owner_links(store, "o", ("d2",))) == ["d2"]


class AppendsBetweenReads(InMemoryEventStore):
    """Right after the first read of command-pending events, another command is issued and an
    earlier one ends: both land while the other kinds are still to be read."""

    def __init__(self, owner: str, device: str) -> None:
        super().__init__()
        self.owner, self.device = owner, device
        self.armed = True

    async def read(  # type: ignore[override]
        self, filter_subject: str = ">", *, after: int = 0, limit: int | None = None
    ) -> AsyncIterator[StoredMessage]:
        async for m in super().read(filter_subject, after=after, limit=limit):
            yield m
        if self.armed and ".command-pending." in filter_subject:
            self.armed = False
            late = ev.CommandPending(href="/a", op="update", content={"v": 2})
            done = ev.CommandSucceeded(href="/a", status="2.04")
            await self.append(
                [
                    binding.to_nats(
                        ev.Event(self.owner, self.device, late, "/t", correlation_id="late")
                    ),
                    binding.to_nats(
                        ev.Event(self.owner, self.device, done, "/t", correlation_id="first")
                    ),
                ]
            )


async def test_a_command_issued_between_the_reads_of_one_refresh_is_read_by_the_next() -> None:
    store = AppendsBetweenReads("o", "d")
    await store.provision()
    first = ev.CommandPending(href="/a", op="update", content={"v": 1})
    await store.append([binding.to_nats(ev.Event("o", "d", first, "/t", correlation_id="first"))])
    commands = CommandLog("o", "d")
    opened, closed = await commands.refresh(store)
    assert (opened, closed) == ([], [])  # "first" began and ended within this pass
    opened, closed = await commands.refresh(store)
    assert [c.correlation_id for c in opened] == ["late"], "the command issued between reads"
    assert closed == []


async def _command_event(store: InMemoryEventStore, data: ev.EventData, cid: str) -> int:
    msg = binding.to_nats(ev.Event("o", "d", data, "/t", correlation_id=cid))
    return (await store.append([msg])).last_position


async def test_a_correlation_id_used_again_after_its_command_ended_is_a_new_command() -> None:
    """The twin accepts an id again once it forgot the command that ended (issue 11 item 4):
    the gateway must deliver that one too, at sign-in and live, not take it for the old one."""
    store = InMemoryEventStore()
    await store.provision()
    await _command_event(store, ev.CommandPending(href="/a", op="update", content={"v": 1}), "x")
    await _command_event(store, ev.CommandSent(href="/a", gateway="g", connection_id="c"), "x")
    await _command_event(store, ev.CommandSucceeded(href="/a", status="2.04"), "x")
    live = CommandLog("o", "d")
    assert await live.refresh(store) == ([], [])
    again = ev.CommandPending(href="/a", op="update", content={"v": 2})
    position = await _command_event(store, again, "x")
    opened, closed = await live.refresh(store)
    assert [(c.correlation_id, c.position, c.content) for c in opened] == [
        ("x", position, {"v": 2})
    ]
    assert opened[0].attempts == 0, "the old command's sends are not this one's"
    assert closed == []
    at_sign_in, _ = await CommandLog("o", "d").refresh(store)  # everything from the start
    assert [(c.correlation_id, c.position) for c in at_sign_in] == [("x", position)]
    await _command_event(store, ev.CommandSucceeded(href="/a", status="2.04"), "x")
    assert await live.refresh(store) == ([], ["x"])
    assert await CommandLog("o", "d").refresh(store) == ([], [])


async def test_a_second_pending_of_an_open_id_is_ignored() -> None:
    store = InMemoryEventStore()
    await store.provision()
    first = await _command_event(store, ev.CommandPending(href="/a", op="update", content=1), "x")
    await _command_event(store, ev.CommandPending(href="/a", op="update", content=2), "x")
    opened, _ = await CommandLog("o", "d").refresh(store)
    assert [(c.position, c.content) for c in opened] == [(first, 1)]


async def test_last_contents_of_the_device_information_are_read_even_if_not_published() -> None:
    """A re-sync compares what the device answers with these (issue 11, item 5): the device
    information is synchronised when discovered, published or not; a resource that was only
    discovered is not synchronised, so what an older gateway recorded of it is not read."""
    store = InMemoryEventStore()
    await store.provision()
    history = [
        e("o", "d1", ev.ResourceLinksPublished(links=(link("/a", 1),))),
        e("o", "d1", ev.ResourceChanged(href="/a", content={"v": 1}, content_format=10000)),
        e("o", "d1", ev.ResourceChanged(href="/oic/d", content={"n": "x"}, content_format=10000)),
        e("o", "d1", ev.ResourceChanged(href="/oic/p", status="4.00")),
        e("o", "d1", ev.ResourceChanged(href="/oc/wk/introspection", status="4.00")),
    ]
    for item in history:
        await store.append([binding.to_nats(item)])
    state = await load_device_state(store, "o", "d1")
    assert state.last_content == {
        "/a": (10000, {"v": 1}),
        "/oic/d": (10000, {"n": "x"}),
        "/oic/p": (None, ("status", "4.00")),
    }
