"""Client-side RPC of simple devices end to end (issue 10 item 3), as ``twinhub up`` composes
it: a device's ``POST /api/v1/{token}/rpc`` (aiocoap's client; libcoap's ``coap-client`` over
UDP and over DTLS) reaches an application (``TwinhubClient`` with an owner token) as an
``rpc-requested`` event; its ``answer_rpc`` (API op ``answer-rpc``) comes back to the device as
the CoAP response. The first answer wins (another is ``conflict``, the same one its repeat);
another owner cannot answer (``not_found``); with no answer in ``gateway.client_rpc_timeout``
the device gets 5.04, and a late answer is ``not_found``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat
from pymongo.asynchronous.database import AsyncDatabase

from proto.events import AnyEvent, RpcRequested
from tests.integration.gateway.simple_peers import coap_client
from twinhub_cli.datadir import DataDir
from twinhub_client import ConflictError, NotFoundError
from twinhub_client.subscription import EventSubscription

from .stack import bus_config, production_callout
from .test_provisioning import WAIT, Env, open_env
from .test_simple_devices import production_gateway
from .test_simple_rpc import _twinhub

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers


def gateway(bus: Bus, tmp: Path, rpc_timeout: float) -> Any:
    """The gateway as ``twinhub gateway`` runs it, with ``gateway.client_rpc_timeout``."""
    return production_gateway(bus, tmp, id="gw-clientrpc", client_rpc_timeout=rpc_timeout)


@pytest.fixture
async def env(bus: Bus, mongo_db: AsyncDatabase[Any]) -> AsyncIterator[Env]:
    async with open_env(bus, mongo_db) as e:
        yield e


@pytest.fixture
async def device_ctx() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield ctx
    finally:
        await ctx.shutdown()


def _url(scheme: str, addr: tuple[str, int] | None, token: str) -> str:
    assert addr is not None
    return f"{scheme}://{addr[0]}:{addr[1]}/api/v1/{token}/rpc"


async def next_request(requests: EventSubscription) -> AnyEvent:
    e = await requests.next(timeout=WAIT)
    assert e is not None and isinstance(e.data, RpcRequested), e
    return e


async def test_an_application_answers_a_devices_call(
    env: Env, bus: Bus, tmp_path: Path, device_ctx: aiocoap.Context
) -> None:
    async with env.client() as app, env.client(env.other) as other:
        issued = await app.provision(name="clock")
        device, token = issued.device_id, issued.token
        async with gateway(bus, tmp_path, rpc_timeout=WAIT) as (gw, _), app.rpc_requests() as reqs:
            msg = aiocoap.Message(
                code=Code.POST,
                uri=_url("coap", gw.udp_address, token),
                payload=b'{"method":"getCurrentTime","params":{"tz":"UTC"}}',
            )
            response = asyncio.create_task(
                asyncio.wait_for(device_ctx.request(msg).response, WAIT + 10)
            )
            e = await next_request(reqs)
            assert isinstance(e.data, RpcRequested)
            assert (e.device_id, e.data.method, e.data.params) == (
                device,
                "getCurrentTime",
                {"tz": "UTC"},
            )
            assert e.data.timeout_ms == int(WAIT * 1000)
            rid = e.data.request_id
            # another owner's application cannot answer it
            with pytest.raises(NotFoundError):
                await other.answer_rpc(device, rid, {"time": 0})
            recorded = await app.answer_rpc(device, rid, {"time": 1700000000000})
            assert (recorded.device_id, recorded.request_id, recorded.repeated) == (
                device,
                rid,
                False,
            )
            got = await response
            assert got.code == Code.CONTENT and got.opt.content_format == ContentFormat.JSON
            assert json.loads(got.payload) == {"time": 1700000000000}
            # the first answer won: another is a conflict, the same one its repeat
            with pytest.raises(ConflictError):
                await app.answer_rpc(device, rid, {"time": 1})
            again = await app.answer_rpc(device, rid, {"time": 1700000000000})
            assert again.repeated and again.position == recorded.position
            with pytest.raises(NotFoundError):
                await app.answer_rpc(device, "no-such-request", 1)


async def test_no_answer_in_time_is_504_and_a_late_answer_not_found(
    env: Env, bus: Bus, tmp_path: Path, device_ctx: aiocoap.Context
) -> None:
    async with env.client() as app:
        issued = await app.provision(name="clock")
        device, token = issued.device_id, issued.token
        async with gateway(bus, tmp_path, rpc_timeout=1.0) as (gw, _):
            msg = aiocoap.Message(
                code=Code.POST, uri=_url("coap", gw.udp_address, token), payload=b"{method:ping}"
            )
            started = time.monotonic()
            got = await asyncio.wait_for(device_ctx.request(msg).response, WAIT)
            assert got.code == Code.GATEWAY_TIMEOUT
            assert time.monotonic() - started >= 0.9
        async with app.rpc_requests(device, from_position=0) as reqs:
            e = await next_request(reqs)
        assert isinstance(e.data, RpcRequested) and e.data.timeout_ms == 1000
        with pytest.raises(NotFoundError, match="expired"):
            await app.answer_rpc(device, e.data.request_id, "late")


def _payload(stdout: str) -> Any:
    """The JSON payload of the 2.05 that coap-client printed (``-v 6``: ``v:1 t:CON c:2.05
    ... :: '<payload>'``)."""
    (line,) = [ln for ln in stdout.splitlines() if " c:2.05 " in ln and " :: " in ln]
    return json.loads(line.split(" :: ", 1)[1].strip("'"))


async def _answer_next(app: Any, reqs: EventSubscription, result: Any) -> AnyEvent:
    e = await next_request(reqs)
    assert isinstance(e.data, RpcRequested)
    await app.answer_rpc(e.device_id, e.data.request_id, result)
    return e


async def test_coap_client_calls_over_udp_and_dtls(env: Env, bus: Bus, tmp_path: Path) -> None:
    """libcoap's coap-client as the device (``-B`` long enough for the answer): it gets the
    empty ACK, then the separate response with the application's answer."""
    async with env.client() as app:
        issued = await app.provision(name="clock")
        device, token = issued.device_id, issued.token
        async with gateway(bus, tmp_path, rpc_timeout=WAIT) as (gw, ca), app.rpc_requests() as reqs:
            body = '{"method":"getCurrentTime","params":{}}'
            device_call = asyncio.create_task(
                coap_client(
                    "-m",
                    "post",
                    "-t",
                    "json",
                    "-e",
                    body,
                    _url("coap", gw.udp_address, token),
                    timeout=WAIT,
                )
            )
            e = await _answer_next(app, reqs, {"time": 42})
            assert isinstance(e.data, RpcRequested) and e.data.method == "getCurrentTime"
            result = await device_call
            assert result.code == "2.05", result.stdout + result.stderr
            assert _payload(result.stdout) == {"time": 42}

            secure_call = asyncio.create_task(
                coap_client(
                    "-m",
                    "post",
                    "-R",
                    str(ca),
                    "-e",
                    "{method:whoami}",
                    _url("coaps", gw.dtls_address, token),
                    timeout=WAIT,
                )
            )
            e = await _answer_next(app, reqs, "you are " + device)
            assert isinstance(e.data, RpcRequested) and e.data.method == "whoami"
            result = await secure_call
            assert result.code == "2.05", result.stdout + result.stderr
            assert _payload(result.stdout) == "you are " + device


async def test_cli_answers_a_call_against_a_local_stack(
    bus: Bus,
    mongo_db: AsyncDatabase[Any],
    mongo_server: Any,
    tmp_path: Path,
    device_ctx: aiocoap.Context,
) -> None:
    """``twinhub rpc answer DEVICE REQUEST_ID [RESULT]`` against a stack of ``twinhub up``."""
    data = DataDir(tmp_path / "stack")
    data.write_stack(
        {"nats_url": bus.url, "mongo_url": mongo_server.url, "database": mongo_db.name}
    )
    async with (
        production_callout(bus, bus_config(bus), data),
        open_env(bus, mongo_db, issuer=data.issuer()) as env,
        env.client() as app,
    ):
        issued = await app.provision(name="cli")
        device, token = issued.device_id, issued.token
        dd = ("--data-dir", str(data.root), "--owner", env.owner)
        async with gateway(bus, tmp_path, rpc_timeout=WAIT) as (gw, _), app.rpc_requests() as reqs:
            msg = aiocoap.Message(
                code=Code.POST, uri=_url("coap", gw.udp_address, token), payload=b"{method:m}"
            )
            response = asyncio.create_task(
                asyncio.wait_for(device_ctx.request(msg).response, WAIT + 10)
            )
            e = await next_request(reqs)
            assert isinstance(e.data, RpcRequested)
            rid = e.data.request_id
            code, out, err = await _twinhub("rpc", "answer", device, rid, '{"ok": true}', *dd)
            assert code == 0, err
            recorded = json.loads(out)
            assert (recorded["device_id"], recorded["request_id"]) == (device, rid)
            got = await response
            assert got.code == Code.CONTENT and json.loads(got.payload) == {"ok": True}
            code, out, err = await _twinhub("rpc", "answer", device, rid, "false", *dd)
            assert code == 1 and "conflict" in err
            code, out, err = await _twinhub("rpc", "answer", device, rid, "{not json", *dd)
            assert code == 2 and "not JSON" in err
