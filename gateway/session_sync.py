"""The sync-and-observe layer of a device session (:mod:`gateway.session`).

Once the device is signed in, :class:`Sync` loads its recorded state, discovers its resources,
observes what is synchronised (one batch observation when the device offers one, else one per
resource), turns reports into ``ResourceChanged`` appends (nothing when the log holds the same
value already), and records ``in_sync`` when every resource reported. Its state is its own: the
resources, the refs of the requests in flight, the notifications held back until their
observation's first response, the last content per resource.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway import ocf
from gateway.errors import BadRequest
from gateway.session_core import SessionCore
from gateway.session_io import (
    OCF_CBOR,
    CancelObservation,
    Close,
    DeviceResponse,
    DeviceState,
    DeviceStateLoaded,
    Effect,
    LoadDeviceState,
    Notification,
    Phase,
    Reply,
    ResourcesKnown,
    SendRequest,
)
from proto import codecs
from proto.errors import CodecError
from proto.events import ResourceChanged, ResourceLink, SyncState, TwinSyncStateChanged

MAX_EARLY_NOTIFICATIONS: Final = 256
"""Notifications kept per observation while its first response has not been handled (the
oldest go first beyond it: the window is a loop turn or two, this bounds a hostile peer)."""


@dataclass(slots=True)
class Resource:
    link: ResourceLink
    ref: int | None = None  # observation / GET in flight
    reported: bool = False
    # A one-shot read is in flight and the batch observation reported the resource meanwhile:
    # the read's answer may be older than that report (it is dropped, see _on_first).
    superseded: bool = False


class Sync:
    """Synchronisation and observation of one signed-in device (see module doc)."""

    def __init__(self, core: SessionCore, published: Mapping[str, ResourceLink]) -> None:
        self.core = core
        self.published = published  # the links layer's: what the device published
        self.sync_state: SyncState = "out_of_sync"
        self._resources: dict[str, Resource] = {}
        self._by_ref: dict[int, str] = {}  # ref -> href ("" = batch)
        # observations whose first response was not handled yet -> notifications fed meanwhile
        self._early: dict[int, list[Reply]] = {}
        self._batch_ref: int | None = None
        self._discovery_ref: int | None = None
        self._state_ref: int | None = None
        self._last: dict[str, tuple[int | None, Any]] = {}
        self._sync_started = False

    def start(self) -> list[Effect]:
        """The device is signed in (its online event is in the log): load its recorded state."""
        assert self.core.device_id is not None
        assert self.core.owner is not None
        self.sync_state = "syncing"
        self._state_ref = self.core.ref()
        return [LoadDeviceState(self._state_ref, self.core.device_id, self.core.owner)]

    def expects(self, loaded: DeviceStateLoaded) -> bool:
        """``loaded`` answers this session's state load, and the session is still signed in."""
        return loaded.ref == self._state_ref and self.core.phase is Phase.SIGNED_IN

    def on_state(self, state: DeviceState) -> list[Effect]:
        """The recorded state is loaded (the links layer took its links): discover."""
        self._last.update(state.last_content)
        self._discovery_ref = self.core.ref()
        self._sync_started = True
        return [SendRequest(self._discovery_ref, "GET", ocf.RES)]

    @property
    def merged(self) -> bool:
        """The discovery is done: a link published now is tracked at once (not merged later)."""
        return self._sync_started and self._discovery_ref is None

    def forget(self, href: str) -> list[Effect]:
        """The device unpublished ``href``: stop observing it."""
        res = self._resources.pop(href, None)
        if res is None or res.ref is None:
            return []
        self._by_ref.pop(res.ref, None)
        self._early.pop(res.ref, None)
        return [CancelObservation(res.ref)]

    def stop(self) -> list[Effect]:
        """The device goes offline: cancel every observation and forget the resources."""
        out: list[Effect] = [CancelObservation(ref) for ref in sorted(self._by_ref)]
        self._by_ref.clear()
        self._early.clear()
        self._resources.clear()
        self._batch_ref = self._discovery_ref = None
        self._sync_started = False
        self.sync_state = "out_of_sync"
        return out

    def on_notification(self, n: Notification) -> list[Effect]:
        early = self._early.get(n.ref)
        if early is None:
            return self._on_report(n.ref, n.reply)
        # The first response came before it on the wire and is on its way: it goes first.
        early.append(n.reply)
        if len(early) > MAX_EARLY_NOTIFICATIONS:
            del early[0]
        return []

    def on_response(self, resp: DeviceResponse) -> list[Effect]:
        early = self._early.pop(resp.ref, ())
        out = self._on_first(resp)
        for reply in early:
            out += self._on_report(resp.ref, reply)
        return out

    def _on_first(self, resp: DeviceResponse) -> list[Effect]:
        if resp.ref == self._discovery_ref:
            return self._on_discovery(resp)
        if resp.ref not in self._by_ref:
            return []
        href = self._by_ref[resp.ref]
        res = self._resources.get(href)
        if res is not None and res.superseded and resp.ref != self._batch_ref:
            # A one-shot read answered after the batch observation reported the resource: the
            # device sent that report before or after this answer, so the answer is not newer.
            self._by_ref.pop(resp.ref, None)
            res.ref, res.superseded, res.reported = None, False, True
            return self._maybe_in_sync()
        if resp.reply is None:
            return self._failed(resp.ref, href, resp.error or "no answer")
        if resp.ref == self._batch_ref:
            return self._on_batch_first(resp.ref, resp.reply)
        out = self._on_report(resp.ref, resp.reply)
        if res is not None and res.link.observable and resp.reply.observe is None:
            self._by_ref.pop(resp.ref, None)  # the device answered without observing
            res.ref = None
        elif res is not None and not res.link.observable:
            self._by_ref.pop(resp.ref, None)
            res.ref = None
        return out

    def _on_discovery(self, resp: DeviceResponse) -> list[Effect]:
        self._discovery_ref = None
        assert self.core.device_id is not None
        discovered: tuple[ResourceLink, ...] = ()
        if resp.reply is not None and resp.reply.code.startswith("2."):
            try:
                value = codecs.decode(resp.reply.payload, resp.reply.content_format or OCF_CBOR)
                discovered = ocf.parse_discovery(value, self.core.device_id)
            except (CodecError, BadRequest):
                discovered = ()
        batch = self.core.config.batch_observe and any(
            link.href == ocf.RES and ocf.BATCH_INTERFACE in link.interfaces for link in discovered
        )
        links = {link.href: link for link in self.published.values()}
        for link in discovered:
            links.setdefault(link.href, link)
        for href, link in links.items():
            if ocf.is_synced(href, published=href in self.published):
                self._resources.setdefault(href, Resource(link))
        known: list[Effect] = [ResourcesKnown(tuple(sorted(links)))]
        if batch and self._resources:
            self._batch_ref = self.core.ref()
            self._by_ref[self._batch_ref] = ""
            self._early[self._batch_ref] = []
            return [
                *known,
                SendRequest(
                    self._batch_ref, "GET", ocf.RES, ("if=" + ocf.BATCH_INTERFACE,), observe=True
                ),
            ]
        return known + self._observe_each() + self._maybe_in_sync()

    def _observe_each(self) -> list[Effect]:
        """Observe every observable resource not observed yet; GET the others once."""
        out: list[Effect] = []
        for href, res in self._resources.items():
            if res.ref is not None or (res.reported and not res.link.observable):
                continue
            res.ref = self.core.ref()
            self._by_ref[res.ref] = href
            if res.link.observable:
                self._early[res.ref] = []
            out.append(SendRequest(res.ref, "GET", href, observe=res.link.observable))
        return out

    def track_links(self, links: list[ResourceLink]) -> list[Effect]:
        if not self._sync_started or self._discovery_ref is not None:
            return []  # the discovery to come merges the published links
        added = [
            link.href
            for link in links
            if ocf.is_syncable(link.href) and link.href not in self._resources
        ]
        for link in links:
            if link.href in added:
                self._resources[link.href] = Resource(link)
        if not added:
            return []
        out: list[Effect] = []
        if self.sync_state == "in_sync":
            self.sync_state = "syncing"
            out.append(
                self.core.append(
                    [
                        self.core.event(
                            TwinSyncStateChanged(
                                state="syncing", connection_id=self.core.config.connection_id
                            )
                        )
                    ],
                    [],
                    [],
                    critical=False,
                )
            )
        if self._batch_ref is None:
            return out + self._observe_each()
        # the batch observation reports later changes; read the new ones once now
        for href in added:
            res = self._resources[href]
            res.ref = self.core.ref()
            self._by_ref[res.ref] = href
            out.append(SendRequest(res.ref, "GET", href))
        return out

    def _on_batch_first(self, ref: int, reply: Reply) -> list[Effect]:
        if reply.code == "4.00" and reply.payload in (b"", b"\x80", b"[]"):
            reply = Reply("2.05", b"\x80", OCF_CBOR, observe=reply.observe)  # empty collection
        if not reply.code.startswith("2."):
            return self._batch_fallback(ref)
        out = self._on_report(ref, reply)
        if reply.observe is None:  # answered without observing: observe one by one
            out += self._batch_fallback(ref)
        return out

    def _batch_fallback(self, ref: int) -> list[Effect]:
        self._by_ref.pop(ref, None)
        self._early.pop(ref, None)
        self._batch_ref = None
        out: list[Effect] = [CancelObservation(ref)]
        return out + self._observe_each() + self._maybe_in_sync()

    def _failed(self, ref: int, href: str, error: str) -> list[Effect]:
        self._by_ref.pop(ref, None)
        if href == "":
            return self._batch_fallback(ref)
        res = self._resources.get(href)
        if res is not None:
            res.ref = None
        return self._report(href, Reply("5.04"), error=error) + self._maybe_in_sync()

    def _on_report(self, ref: int, reply: Reply) -> list[Effect]:
        href = self._by_ref.get(ref)
        if href is None or self.core.phase is not Phase.SIGNED_IN:
            return []
        if href == "":
            assert self.core.device_id is not None
            try:
                value = codecs.decode(reply.payload, reply.content_format or OCF_CBOR)
                items = ocf.parse_batch(value, self.core.device_id)
            except (CodecError, BadRequest):
                return []
            out: list[Effect] = []
            for item_href, rep in items:
                res = self._resources.get(item_href)
                if res is None:
                    continue  # not synced (see ocf.is_synced): the twin holds what is published
                if res.ref is not None and reply.observe is not None:
                    res.superseded = True  # reported by the established batch observation
                content, lossy = codecs.to_json_value(ocf.strip_baseline(rep))
                raw = codecs.encode(rep, OCF_CBOR) if lossy else None
                out += self._report_value(item_href, reply, content, OCF_CBOR, raw)
            return out + self._maybe_in_sync()
        return self._report(href, reply) + self._maybe_in_sync()

    def _report(self, href: str, reply: Reply, error: str = "") -> list[Effect]:
        cf = reply.content_format
        try:
            value = codecs.decode(reply.payload, cf if cf is not None else OCF_CBOR)
            raw_needed = False
        except CodecError:
            value, raw_needed = None, True
        content, lossy = codecs.to_json_value(value)
        raw = reply.payload if (raw_needed or lossy) else None
        return self._report_value(href, reply, content, cf, raw)

    def _report_value(
        self, href: str, reply: Reply, content: Any, cf: int | None, raw: bytes | None
    ) -> list[Effect]:
        res = self._resources.get(href)
        if res is not None:
            res.reported = True
        key = (cf, content) if reply.code.startswith("2.") else (None, ("status", reply.code))
        if self._last.get(href) == key:
            return []  # identical to what the log holds already
        self._last[href] = key
        ev = self.core.event(
            ResourceChanged(
                href=href,
                content=content,
                content_format=cf,
                raw=base64.b64encode(raw).decode("ascii") if raw is not None else None,
                status=reply.code,
                etag=reply.etag.hex() if reply.etag else None,
                observe_seq=reply.observe,
                connection_id=self.core.config.connection_id,
            )
        )
        # Not critical: no device reply waits for it. The writer keeps it (bounded) until the
        # log is back; only a give-up (drain timeout, refusal) fails it and closes.
        return [self.core.append([ev], [], [Close("event log unavailable")], critical=False)]

    def _maybe_in_sync(self) -> list[Effect]:
        if self.sync_state != "syncing" or self._discovery_ref is not None:
            return []
        if any(not r.reported for r in self._resources.values()):
            return []
        self.sync_state = "in_sync"
        ev = self.core.event(
            TwinSyncStateChanged(state="in_sync", connection_id=self.core.config.connection_id)
        )
        return [self.core.append([ev], [], [Close("event log unavailable")], critical=False)]
