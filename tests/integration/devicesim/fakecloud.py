"""A small fake OCF cloud on aiocoap, to test the device simulator without the gateway.

It listens on 127.0.0.1, port 0 (aiocoap's own ``TCPServer.create_server`` cannot: it maps port 0
to the default port and adds 1 for TLS), answers sign-up / sign-in / sign-out / token refresh /
publish, and sends GET / Observe / POST back to the device over the device's own connection
(the incoming request's ``remote`` is that connection). It records everything it received,
including which message came first on each connection, and it accepts a device that never sends
a CSM (aiocoap would abort such a connection at its first request).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiocoap import Context, Message, resource
from aiocoap.numbers.codes import CSM, Code
from aiocoap.transports.tcp import TcpConnection, TCPServer

from devicesim.stats import Signal
from proto import codecs
from proto.codecs import ContentFormat

OCF_CBOR = int(ContentFormat.OCF_CBOR)
log = logging.getLogger("fakecloud")


@dataclass
class Received:
    """A request the cloud received."""

    method: str
    path: str
    query: tuple[str, ...]
    value: Any
    content_format: int | None
    options: dict[int, list[bytes]]
    conn: CloudConnection


@dataclass
class Reply:
    code: str
    value: Any
    content_format: int | None
    observe: int | None
    options: dict[int, list[bytes]]


@dataclass
class Observation:
    """The cloud observing one device resource: first reply, then notifications."""

    first: Reply
    notifications: list[Reply] = field(default_factory=list)
    cancel: Callable[[], None] = lambda: None
    ended: bool = False
    error: Exception | None = None


@dataclass
class DeviceRecord:
    uid: str = ""
    access_token: str = ""
    refresh_token: str = ""
    conn: CloudConnection | None = None
    sign_ups: int = 0
    sign_ins: int = 0
    sign_outs: int = 0
    refreshes: int = 0
    publishes: int = 0
    links: list[Any] = field(default_factory=list)


def _options(msg: Any) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for opt in msg.opt.option_list():
        out.setdefault(int(opt.number), []).append(opt.encode())
    return out


class CloudConnection(TcpConnection):  # type: ignore[misc]
    def __init__(self, owner: Any, log: Any, loop: Any, cloud: FakeCloud) -> None:
        super().__init__(owner, log, loop, is_server=True)
        self._remote_settings = {}  # tolerate a device that sends no CSM (iotivity-lite)
        self.cloud = cloud
        self.first_code: int | None = None
        self.csm_received = False
        self.signalling: list[int] = []
        self.peer_cert: Any = None
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.peer_cert = transport.get_extra_info("peercert")
        self.cloud.connections.append(self)
        self.cloud.signal.notify()

    def _note(self, code: int) -> None:
        if self.first_code is None:
            self.first_code = code
        self.cloud.signal.notify()

    def _process_signaling(self, msg: Any) -> None:
        self._note(int(msg.code))
        self.signalling.append(int(msg.code))
        if msg.code == CSM:
            self.csm_received = True
        super()._process_signaling(msg)

    def connection_lost(self, exc: Any) -> None:
        self.closed = True
        super().connection_lost(exc)
        self.cloud.signal.notify()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class CloudServer(TCPServer):  # type: ignore[misc]
    @classmethod
    async def listen(
        cls, tman: Any, cloud: FakeCloud, ssl_context: ssl.SSLContext | None
    ) -> CloudServer:
        self = cls()
        self._tokenmanager = tman
        self.log = log
        if ssl_context is not None:
            self._scheme = "coaps+tcp"
            self._default_port = 5684
        loop = asyncio.get_running_loop()

        def new_connection() -> CloudConnection:
            c = CloudConnection(self, log, loop, cloud)
            self._pool.add(c)
            return c

        self.server = await loop.create_server(new_connection, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def _dispatch_incoming(self, connection: Any, msg: Any) -> None:
        connection._note(int(msg.code))
        super()._dispatch_incoming(connection, msg)

    async def shutdown(self) -> None:
        for c in list(self._pool):
            c.close()
        self._tokenmanager = None
        self.server.close()
        await self.server.wait_closed()


class _Handler(resource.Resource):  # type: ignore[misc]
    def __init__(self, cloud: FakeCloud, path: str) -> None:
        super().__init__()
        self.cloud = cloud
        self.path = path

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_post(self, request: Any) -> Any:
        return self.cloud._handle("POST", self.path, request)

    async def render_delete(self, request: Any) -> Any:
        return self.cloud._handle("DELETE", self.path, request)


class FakeCloud:
    """``async with FakeCloud() as cloud``; ``cloud.uri`` is where devices connect."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        expires_in: int = 3600,
        auto_observe: bool = False,
    ) -> None:
        self.ssl_context = ssl_context
        self.expires_in = expires_in
        self.auto_observe = auto_observe
        self.signal = Signal()
        self.received: list[Received] = []
        self.devices: dict[str, DeviceRecord] = {}
        self.connections: list[CloudConnection] = []
        self.observations: dict[tuple[str, str], Observation] = {}
        self.refuse_sign_in: set[str] = set()
        self._counter = itertools.count(1)
        self._ctx: Any = None
        self._server: CloudServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> FakeCloud:
        site = resource.Site()
        for path in ("/oic/sec/account", "/oic/sec/session", "/oic/sec/tokenrefresh", "/oic/rd"):
            site.add_resource(tuple(path.strip("/").split("/")), _Handler(self, path))
        ctx = Context(loop=asyncio.get_running_loop(), serversite=site, loggername="fakecloud")
        servers: list[CloudServer] = []

        async def make(tman: Any) -> CloudServer:
            s = await CloudServer.listen(tman, self, self.ssl_context)
            servers.append(s)
            return s

        await ctx._append_tokenmanaged_transport(make)
        self._ctx = ctx
        self._server = servers[0]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._ctx.shutdown()

    @property
    def uri(self) -> str:
        assert self._server is not None
        scheme = "coaps+tcp" if self.ssl_context is not None else "coap+tcp"
        return f"{scheme}://127.0.0.1:{self._server.port}"

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        await self.signal.wait_until(predicate, timeout)

    def requests_to(self, path: str, di: str | None = None) -> list[Received]:
        return [
            r
            for r in self.received
            if r.path == path and (di is None or (r.value or {}).get("di") == di)
        ]

    # --- the OCF cloud side ---------------------------------------------------------------

    def _reply(self, value: Any, code: Code = Code.CHANGED) -> Any:
        return Message(code=code, payload=codecs.encode(value, OCF_CBOR), content_format=OCF_CBOR)

    def _handle(self, method: str, path: str, request: Any) -> Any:
        cf = request.opt.content_format
        value = codecs.decode(bytes(request.payload), int(cf) if cf is not None else OCF_CBOR)
        conn = request.remote
        self.received.append(
            Received(
                method,
                path,
                tuple(request.opt.uri_query),
                value,
                int(cf) if cf is not None else None,
                _options(request),
                conn,
            )
        )
        self.signal.notify()
        di = value.get("di") if isinstance(value, dict) else None
        if not isinstance(di, str):
            return Message(code=Code.BAD_REQUEST, payload=b"missing di")
        dev = self.devices.setdefault(di, DeviceRecord())
        n = next(self._counter)
        if path == "/oic/sec/account" and method == "POST":
            if not value.get("accesstoken") or value.get("authprovider") != "twinhub":
                return Message(code=Code.BAD_REQUEST, payload=b"bad sign-up")
            dev.uid, dev.access_token, dev.refresh_token = "owner-1", f"at-{n}", f"rt-{n}"
            dev.sign_ups += 1
            return self._reply(
                {
                    "accesstoken": dev.access_token,
                    "refreshtoken": dev.refresh_token,
                    "uid": dev.uid,
                    "expiresin": self.expires_in,
                    "redirecturi": "",
                }
            )
        if path == "/oic/sec/session":
            if value.get("login") is True:
                if (
                    di in self.refuse_sign_in
                    or value.get("accesstoken") != dev.access_token
                    or value.get("uid") != dev.uid
                ):
                    return Message(code=Code.UNAUTHORIZED, payload=b"bad token")
                dev.sign_ins += 1
                dev.conn = conn
                return self._reply({"expiresin": self.expires_in})
            dev.sign_outs += 1
            return self._reply({})
        if path == "/oic/sec/tokenrefresh":
            if value.get("refreshtoken") != dev.refresh_token:
                return Message(code=Code.UNAUTHORIZED, payload=b"bad refresh token")
            dev.access_token, dev.refresh_token = f"at-{n}", f"rt-{n}"
            dev.refreshes += 1
            return self._reply(
                {
                    "accesstoken": dev.access_token,
                    "refreshtoken": dev.refresh_token,
                    "expiresin": self.expires_in,
                }
            )
        if path == "/oic/rd" and method == "POST":
            if dev.conn is not conn:
                return Message(code=Code.UNAUTHORIZED, payload=b"not signed in")
            dev.publishes += 1
            dev.links = list(value["links"])
            if self.auto_observe:
                task = asyncio.create_task(self._observe_published(di), name=f"observe {di}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return self._reply({"di": di, "links": value["links"], "ttl": value.get("ttl", 0)})
        return Message(code=Code.METHOD_NOT_ALLOWED)

    async def _observe_published(self, di: str) -> None:
        for link in self.devices[di].links:
            if link["href"].startswith("/light/"):
                await self.observe(di, link["href"])

    # --- requests to the device over its connection ---------------------------------------

    def _request(
        self, di: str, method: str, path: str, query: tuple[str, ...] = (), value: Any = None
    ) -> Any:
        conn = self.devices[di].conn
        assert conn is not None, f"{di} is not signed in"
        msg = Message(code=getattr(Code, method), uri_path=tuple(path.strip("/").split("/")))
        if query:
            msg.opt.uri_query = query
        if value is not None:
            msg.payload = codecs.encode(value, OCF_CBOR)
            msg.opt.content_format = OCF_CBOR
        msg.remote = conn
        return msg

    @staticmethod
    def _to_reply(resp: Any) -> Reply:
        cf = resp.opt.content_format
        fmt = int(cf) if cf is not None else None
        raw = bytes(resp.payload)
        value = codecs.decode(raw, fmt if fmt is not None else 0) if raw else None
        return Reply(resp.code.dotted, value, fmt, resp.opt.observe, _options(resp))

    async def request(
        self, di: str, method: str, path: str, query: tuple[str, ...] = (), value: Any = None
    ) -> Reply:
        msg = self._request(di, method, path, query, value)
        async with asyncio.timeout(10):
            resp = await self._ctx.request(msg, handle_blockwise=False).response
        return self._to_reply(resp)

    async def observe(self, di: str, path: str, query: tuple[str, ...] = ()) -> Observation:
        msg = self._request(di, "GET", path, query)
        msg.opt.observe = 0
        req = self._ctx.request(msg, handle_blockwise=False)
        async with asyncio.timeout(10):
            first = self._to_reply(await req.response)
        obs = Observation(first)
        self.observations[(di, path + ("?" + "&".join(query) if query else ""))] = obs
        if req.observation is not None and first.observe is not None:
            task = asyncio.create_task(self._follow(req.observation, obs), name=f"follow {path}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            obs.cancel = req.observation.cancel
        self.signal.notify()
        return obs

    async def _follow(self, observation: Any, obs: Observation) -> None:
        try:
            async for resp in observation:
                obs.notifications.append(self._to_reply(resp))
                self.signal.notify()
        except Exception as e:  # the observation ended with an error (connection gone)
            obs.error = e
        obs.ended = True
        self.signal.notify()

    def drop(self, di: str) -> None:
        """Close the device's connection from the cloud side."""
        conn = self.devices[di].conn
        assert conn is not None
        self.devices[di].conn = None
        conn.close()
