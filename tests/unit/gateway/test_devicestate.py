from __future__ import annotations

from eventstore.memory import InMemoryEventStore
from gateway.devicestate import discover_owner_links, load_device_state
from proto import binding
from proto import events as ev


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
