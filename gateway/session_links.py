"""The links-and-discovery layer of a device session (:mod:`gateway.session`).

:class:`Links` owns what the device published (``/oic/rd`` publish and unpublish, the instance
numbers it gives links without one) and answers the cloud-side discovery of the owner's devices
(``GET /oic/res``, read from the log by the driver). A published link is handed to the sync
layer, which observes it.
"""

from __future__ import annotations

import msgspec

from gateway import ocf
from gateway.errors import BadRequest, Unauthorized
from gateway.session_core import SessionCore
from gateway.session_io import DeviceRequest, Discover, Discovered, Effect, ResourcesKnown, Respond
from gateway.session_sync import Sync
from proto.events import ResourceLink, ResourceLinksPublished, ResourceLinksUnpublished


class Links:
    """The device's published links and cloud discovery (see module doc)."""

    def __init__(self, core: SessionCore, sync: Sync, published: dict[str, ResourceLink]) -> None:
        self.core = core
        self.sync = sync
        self.published = published  # by href; the sync layer reads it
        self._next_ins = 1
        self._discoveries: dict[int, DeviceRequest] = {}

    def load(self, links: tuple[ResourceLink, ...]) -> None:
        """The links the log holds (loaded at sign-in): published before, by any connection."""
        for link in links:
            self.published.setdefault(link.href, link)
            if link.ins is not None:
                self._next_ins = max(self._next_ins, link.ins + 1)

    def publish(self, req: DeviceRequest, pub: ocf.Publish) -> list[Effect]:
        if pub.device_id != self.core.device_id:
            raise Unauthorized("publish for another device")
        if len(self.published) + len(pub.links) > self.core.config.max_links:
            raise BadRequest("too many published links")
        links: list[ResourceLink] = []
        for link in pub.links:
            ins = link.ins
            if ins is None:
                prev = self.published.get(link.href)
                ins = prev.ins if prev is not None and prev.ins is not None else self._next_ins
            self._next_ins = max(self._next_ins, ins + 1)
            links.append(_with_ins(link, ins))
        reply = self.core.reply(
            req,
            "2.04",
            {
                "di": pub.device_id,
                "links": [ocf.link_reply(link, pub.device_id) for link in links],
                "ttl": pub.ttl,
            },
        )
        ev = self.core.event(ResourceLinksPublished(links=tuple(links), ttl=pub.ttl))
        for link in links:
            self.published[link.href] = link
        follow = self.sync.track_links(links)
        if self.sync.merged:
            follow.insert(0, ResourcesKnown(tuple(link.href for link in links)))
        return [
            self.core.append(
                [ev], [reply, *follow], [Respond(req.rid, "5.03", b"event log unavailable", 0)]
            )
        ]

    def unpublish(self, req: DeviceRequest, up: ocf.Unpublish) -> list[Effect]:
        if up.device_id != self.core.device_id:
            raise Unauthorized("unpublish for another device")
        wanted = set(up.instance_ids)
        hrefs = tuple(h for h, link in self.published.items() if not wanted or link.ins in wanted)
        out: list[Effect] = []
        for h in hrefs:
            self.published.pop(h, None)
            out += self.sync.forget(h)
        ev = self.core.event(ResourceLinksUnpublished(hrefs=hrefs, instance_ids=up.instance_ids))
        out.append(
            self.core.append(
                [ev],
                [Respond(req.rid, "2.02")],
                [Respond(req.rid, "5.03", b"event log unavailable", 0)],
            )
        )
        return out

    def discover(self, req: DeviceRequest) -> list[Effect]:
        """Cloud-side discovery of the owner's devices: the driver reads the links from the log."""
        assert self.core.owner is not None
        params = ocf.query_params(req.query)
        ref = self.core.ref()
        self._discoveries[ref] = req
        return [
            Discover(ref, self.core.owner, tuple(params.get("di", [])), tuple(params.get("rt", [])))
        ]

    def on_discovered(self, res: Discovered) -> list[Effect]:
        req = self._discoveries.pop(res.ref, None)
        if req is None:
            return []
        if res.links is None:
            return [Respond(req.rid, "5.03", b"event log unavailable", 0)]
        params = ocf.query_params(req.query)
        rts = set(params.get("rt", []))
        body = []
        for device_id, links in sorted(res.links.items()):
            chosen = [
                ocf.link_reply(link, device_id)
                for link in links
                if not rts or rts.intersection(link.rt)
            ]
            if chosen:
                body.append({"di": device_id, "links": chosen})
        return [self.core.reply(req, "2.05", body)]


def _with_ins(link: ResourceLink, ins: int) -> ResourceLink:
    return msgspec.structs.replace(link, ins=ins)
