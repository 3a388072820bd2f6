"""The command API's sans-IO core on server-side RPC (issue 10 item 3): an ``rpc`` to a simple
device is recorded as a command of op ``rpc`` on ``/rpc`` carrying method and params; an OCF
device gets ``bad_request``, as does an OCF operation on a simple device; a repeat is the same
request only with the same method and params."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from proto import api
from proto import events as ev
from twin import commands
from twin.commands import Answer, Record
from twin.fold import fold, fold_all
from twin.model import EndedCommand, Twin

from .factory import T0, event

NOW = T0 + timedelta(seconds=100)


def simple(owner: str = "alice") -> Twin:
    twin = fold_all(None, [event(ev.DeviceProvisioned(token_hash="ab" * 32), 1, owner=owner)])
    assert twin is not None and twin.simple
    return twin


def ocf() -> Twin:
    twin = fold_all(None, [event(ev.DeviceRegistered(), 1)])
    assert twin is not None and not twin.simple
    return twin


def rpc(cid: str | None = "r1", **kw: Any) -> api.CallRpc:
    kw.setdefault("method", "setGpio")
    kw.setdefault("params", {"pin": 4, "value": 1})
    return api.CallRpc(device_id="d1", correlation_id=cid, **kw)


def decide(request: commands.DeviceRequest, twin: Twin, **kw: Any) -> commands.Decision:
    return commands.decide(request, "alice", twin, NOW, expected_last=0, **kw)


def recorded(twin: Twin, request: api.CallRpc, position: int) -> Twin:
    decision = decide(request, twin)
    assert isinstance(decision, Record)
    (pending,) = decision.events
    after = fold(twin, replace(pending, position=position))
    assert after is not None
    return after


def bad_request(decision: commands.Decision) -> str:
    assert isinstance(decision, Answer)
    error = decision.reply.error
    assert not decision.reply.ok and error is not None and error.code == "bad_request"
    return error.message


def test_an_rpc_to_a_simple_device_is_recorded_as_a_pending_rpc_command() -> None:
    decision = decide(rpc(ttl=30, max_attempts=2), simple())
    assert isinstance(decision, Record)
    (pending,) = decision.events
    assert pending.correlation_id == "r1"
    assert pending.data == ev.CommandPending(
        href="/rpc",
        op="rpc",
        content={"method": "setGpio", "params": {"pin": 4, "value": 1}},
        expires_at=NOW + timedelta(seconds=30),
        max_attempts=2,
        issued_by="alice",
    )
    assert decision.scope == "twinhub.ev.alice.d1.command-pending.>"
    reply = decision.reply([7])
    assert reply.ok and isinstance(reply.result, api.CommandAccepted)
    assert (reply.result.href, reply.result.position) == ("/rpc", 7)


def test_params_default_to_null() -> None:
    decision = decide(api.CallRpc(device_id="d1", method="reboot"), simple())
    assert isinstance(decision, Record)
    assert decision.events[0].data.content == {"method": "reboot", "params": None}  # type: ignore[union-attr]


def test_the_twin_lists_the_rpc_as_pending_with_method_and_params() -> None:
    twin = recorded(simple(), rpc(), 5)
    (command,) = twin.pending
    assert (command.op, command.href, command.position) == ("rpc", "/rpc", 5)
    reply = commands.pending_list(api.ListPending(), "alice", [twin])
    assert isinstance(reply.result, api.PendingList)
    (entry,) = reply.result.commands
    assert entry.op == "rpc"
    assert entry.content == {"method": "setGpio", "params": {"pin": 4, "value": 1}}


def test_an_rpc_to_an_ocf_device_is_a_bad_request() -> None:
    assert "OCF device" in bad_request(decide(rpc(), ocf()))


@pytest.mark.parametrize(
    "request_",
    [
        api.UpdateResource(device_id="d1", href="/light", content={"value": True}),
        api.RetrieveResource(device_id="d1", href="/oic/d"),
        api.CreateResource(device_id="d1", href="/c", content={}),
        api.DeleteResource(device_id="d1", href="/c"),
    ],
)
def test_an_ocf_operation_on_a_simple_device_is_a_bad_request(
    request_: commands.CommandRequest,
) -> None:
    assert "simple device" in bad_request(decide(request_, simple()))


@pytest.mark.parametrize("method", ["", "x" * (api.MAX_RPC_METHOD + 1), "a\nb"])
def test_a_bad_method_is_a_bad_request(method: str) -> None:
    assert "method" in bad_request(decide(rpc(method=method), simple()))


def test_a_bad_ttl_is_a_bad_request() -> None:
    assert "ttl" in bad_request(decide(rpc(ttl=0), simple()))


def test_the_same_rpc_again_gets_the_original_acceptance() -> None:
    twin = recorded(simple(), rpc(), 5)
    # the same params with another key order are the same request
    again = decide(rpc(params={"value": 1, "pin": 4}), twin, ended=None)
    assert isinstance(again, Answer) and again.reply.ok
    assert isinstance(again.reply.result, api.CommandAccepted)
    assert again.reply.result.repeated and again.reply.result.position == 5


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        (rpc(method="other"), "method"),
        (rpc(params={"pin": 4, "value": 1.0}), "params"),  # 1.0 is not 1
        (rpc(params=None), "params"),
        (rpc(ttl=61), "ttl"),
        (rpc(max_attempts=4), "max_attempts"),
    ],
)
def test_a_different_rpc_under_the_id_is_a_conflict_open_or_ended(
    changed: api.CallRpc, field: str
) -> None:
    twin = recorded(simple(), rpc(), 5)
    command = twin.pending[0]
    assert field in commands.differences(changed, command)
    assert commands.differences(rpc(), command) == ()
    reply = decide(changed, twin)
    assert isinstance(reply, Answer) and reply.reply.error is not None
    assert reply.reply.error.code == "conflict" and field in reply.reply.error.message
    succeeded = ev.Event(
        owner="alice",
        device_id="d1",
        data=ev.CommandSucceeded(href="/rpc", status="2.04", content={"ok": True}),
        source="/gateway/test",
        time=NOW,
        correlation_id="r1",
        position=6,
    )
    after = fold(twin, succeeded)
    assert after is not None and after.pending == ()
    ended = EndedCommand.between(twin, after, "r1")
    assert ended is not None
    ended = replace(ended, forget_at=NOW + timedelta(hours=1))
    reply = decide(changed, after, ended=ended)
    assert isinstance(reply, Answer) and reply.reply.error is not None
    assert reply.reply.error.code == "conflict" and field in reply.reply.error.message
    same = decide(rpc(), after, ended=ended)
    assert isinstance(same, Answer) and isinstance(same.reply.result, api.CommandAccepted)
    assert same.reply.result.state == "succeeded"


def test_an_rpc_id_that_names_an_update_is_a_conflict_in_op() -> None:
    twin = fold_all(None, [event(ev.DeviceRegistered(), 1)])
    assert twin is not None
    decision = commands.decide(
        api.UpdateResource(device_id="d1", href="/rpc", correlation_id="r1", content=1),
        "alice",
        twin,
        NOW,
        expected_last=0,
    )
    assert isinstance(decision, Record)
    command = fold(twin, replace(decision.events[0], position=5))
    assert command is not None
    assert "op" in commands.differences(rpc(), command.pending[0])


def test_expiry_ends_an_rpc_like_any_command() -> None:
    twin = recorded(simple(), rpc(ttl=10), 5)
    assert commands.expiry_events(twin, NOW + timedelta(seconds=9)) == ()
    (expired,) = commands.expiry_events(twin, NOW + timedelta(seconds=11))
    assert expired.data == ev.CommandExpired(href="/rpc", attempts=0)
    assert expired.correlation_id == "r1"
