"""The device's CoAP server side: aiocoap resources serving a :class:`DeviceModel`.

* ``/oic/res`` — discovery links (oic.if.ll, the default), ``{"rt", "if", "links"}`` with
  oic.if.baseline, and the batch representation with oic.if.b, whose Observe is accepted only
  under :attr:`BatchSupport.OBSERVE`: its first response holds every resource, each notification
  the ones that changed since the previous one.
* ``/oic/d``, ``/oic/p`` — device and platform info (GET only, not observable).
* ``/oc/wk/introspection`` (when configured) — listed, never published, a GET is answered 4.00,
  as the reference stack does.
* ``/light/N`` — GET, Observe, and POST (applies the given properties, answers 2.04 with the new
  representation and notifies observers).

Payloads are encoded in the request's Accept format when it is one we speak, else the device's
configured format; the reference stack adds OCF-Content-Format-Version to every reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from aiocoap import Message, resource
from aiocoap.numbers.codes import Code

from devicesim import ocf
from devicesim.config import BatchSupport
from devicesim.resources import DeviceModel, UpdateRejected
from devicesim.stats import DeviceStats
from devicesim.transport import add_ocf_version_options
from proto import codecs
from proto.codecs import ContentFormat
from proto.errors import CodecError

SUPPORTED_FORMATS: Final = frozenset(
    {int(ContentFormat.OCF_CBOR), int(ContentFormat.CBOR), int(ContentFormat.JSON)}
)


class _Codec:
    """Reply construction shared by every resource of one device."""

    def __init__(self, content_format: int, reference_stack: bool) -> None:
        self.content_format = content_format
        self.reference_stack = reference_stack

    def reply(self, request: Any, value: Any, code: Code = Code.CONTENT) -> Any:
        accept = request.opt.accept
        cf = self.content_format
        if accept is not None:
            if int(accept) not in SUPPORTED_FORMATS:
                return self.error(Code.NOT_ACCEPTABLE, f"cannot answer in format {int(accept)}")
            cf = int(accept)
        msg = Message(code=code, payload=codecs.encode(value, cf), content_format=cf)
        if self.reference_stack:
            add_ocf_version_options(msg, accept=False)
        return msg

    def error(self, code: Code, diagnostic: str) -> Any:
        msg = Message(code=code, payload=diagnostic.encode("utf-8"))
        msg.opt.content_format = int(ContentFormat.TEXT)
        return msg

    def decode(self, request: Any) -> Any:
        cf = request.opt.content_format
        fmt = int(cf) if cf is not None else self.content_format
        if fmt not in SUPPORTED_FORMATS:
            raise _Refused(Code.UNSUPPORTED_CONTENT_FORMAT, f"unsupported content format {fmt}")
        try:
            return codecs.decode(bytes(request.payload), fmt)
        except CodecError as e:
            raise _Refused(Code.BAD_REQUEST, str(e)) from None


class _Refused(Exception):
    def __init__(self, code: Code, diagnostic: str) -> None:
        super().__init__(diagnostic)
        self.code = code


def _interfaces(request: Any) -> list[str]:
    return ocf.query_params(request.opt.uri_query).get("if", [])


class _InfoResource(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    def __init__(self, model: DeviceModel, href: str, codec: _Codec) -> None:
        super().__init__()
        self._model = model
        self._href = href
        self._codec = codec

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_get(self, request: Any) -> Any:
        baseline = ocf.IF_BASELINE in _interfaces(request)
        return self._codec.reply(request, self._model.representation(self._href, baseline=baseline))


class _RefusedResource(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    """A resource the device lists but does not serve (the reference stack's introspection)."""

    def __init__(self, codec: _Codec) -> None:
        super().__init__()
        self._codec = codec

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_get(self, request: Any) -> Any:
        return self._codec.error(Code.BAD_REQUEST, "no introspection data")


class _LightResource(resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped
    def __init__(
        self,
        model: DeviceModel,
        href: str,
        codec: _Codec,
        stats: DeviceStats,
        now_ns: Callable[[], int],
        on_change: Callable[[str], None],
    ) -> None:
        super().__init__()
        self._model = model
        self._href = href
        self._codec = codec
        self._stats = stats
        self._now_ns = now_ns
        self._on_change = on_change

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_get(self, request: Any) -> Any:
        baseline = ocf.IF_BASELINE in _interfaces(request)
        return self._codec.reply(request, self._model.representation(self._href, baseline=baseline))

    async def render_post(self, request: Any) -> Any:
        try:
            payload = self._codec.decode(request)
            rep = self._model.apply_update(self._href, payload, self._now_ns())
        except _Refused as e:
            return self._codec.error(e.code, str(e))
        except UpdateRejected as e:
            return self._codec.error(Code.BAD_REQUEST, str(e))
        self._stats.bump("updates_applied")
        self._on_change(self._href)
        return self._codec.reply(request, rep, Code.CHANGED)


class _DiscoveryResource(resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped
    def __init__(self, model: DeviceModel, codec: _Codec) -> None:
        super().__init__()
        self._model = model
        self._codec = codec
        # Per batch observation (keyed by its request): hrefs changed since its last response;
        # None until the first (full) response went out.
        self._pending: dict[int, set[str] | None] = {}

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def add_observation(self, request: Any, serverobservation: Any) -> None:
        if (
            ocf.IF_BATCH not in _interfaces(request)
            or self._model.batch_support is not BatchSupport.OBSERVE
        ):
            # Decline: answer once, without the Observe option. aiocoap 0.4.17 crashes the render
            # task of an observation that was never accepted (it calls the missing cancellation
            # callback), so accept and deregister early instead.
            serverobservation.accept(lambda: None)
            serverobservation.deregister()
            return
        key = id(request)
        self._pending[key] = None
        self._observations.add(serverobservation)

        def cancel() -> None:
            self._observations.discard(serverobservation)
            self._pending.pop(key, None)

        serverobservation.accept(cancel)

    async def render_get(self, request: Any) -> Any:
        params = ocf.query_params(request.opt.uri_query)
        ifs = params.get("if", [])
        if ocf.IF_BATCH in ifs:
            if self._model.batch_support is BatchSupport.REJECT:
                return self._codec.error(Code.BAD_REQUEST, "batch interface not supported")
            key = id(request)
            pending = self._pending.get(key)
            batch = self._model.batch(None if pending is None else sorted(pending))
            if key in self._pending:
                self._pending[key] = set()
            return self._codec.reply(request, batch)
        rt = params["rt"][0] if params.get("rt") else None
        links = self._model.links(rt=rt)
        if ocf.IF_BASELINE in ifs:
            info = self._model.info(ocf.RES)
            value: Any = {"rt": list(info.rt), "if": list(info.interfaces), "links": links}
        else:
            value = links
        return self._codec.reply(request, value)

    def changed(self, href: str) -> None:
        if not self._observations:
            return
        for pending in self._pending.values():
            if pending is not None:
                pending.add(href)
        self.updated_state()


class DeviceSite:
    """The aiocoap site of one device plus the hook that turns a change into notifications."""

    def __init__(
        self,
        model: DeviceModel,
        *,
        content_format: int,
        reference_stack: bool,
        stats: DeviceStats,
        now_ns: Callable[[], int],
    ) -> None:
        codec = _Codec(content_format, reference_stack)
        self.site = resource.Site()
        self._discovery = _DiscoveryResource(model, codec)
        self.site.add_resource(ocf.uri_path(ocf.RES), self._discovery)
        self.site.add_resource(ocf.uri_path(ocf.DEVICE), _InfoResource(model, ocf.DEVICE, codec))
        self.site.add_resource(
            ocf.uri_path(ocf.PLATFORM), _InfoResource(model, ocf.PLATFORM, codec)
        )
        if model.has(ocf.INTROSPECTION):
            self.site.add_resource(ocf.uri_path(ocf.INTROSPECTION), _RefusedResource(codec))
        self._lights: dict[str, _LightResource] = {}
        for href in model.user_hrefs:
            light = _LightResource(model, href, codec, stats, now_ns, self.changed)
            self._lights[href] = light
            self.site.add_resource(ocf.uri_path(href), light)

    def changed(self, href: str) -> None:
        """``href`` has a new value: notify its observers and the batch observers."""
        light = self._lights.get(href)
        if light is not None:
            light.updated_state()
        self._discovery.changed(href)

    def observer_count(self, href: str) -> int:
        light = self._lights.get(href)
        return len(light._observations) if light is not None else 0
