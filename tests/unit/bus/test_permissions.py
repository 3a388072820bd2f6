"""Who may do what on the bus (bus.permissions), checked on concrete subjects with NATS's
matching rules (tests/unit/bus/matching.py), not by comparing pattern strings."""

from __future__ import annotations

import pytest

from bus.permissions import (
    API_SUBJECTS,
    APP_JS_PREFIX,
    CALLOUT_SUBJECT,
    ROLES,
    Permissions,
    Role,
    application_permissions,
    inbox_prefix,
    service_permissions,
)
from proto import api, subjects
from proto.errors import SubjectError
from proto.leases import LEASE_STREAM, Writer, lease_subject

from .matching import covers, may_publish, may_subscribe, permitted

STREAM = "TWINHUB_EVENTS"
PROJECTOR = "twin-projector"
RESERVED = (PROJECTOR, "other-reserved")
JS = APP_JS_PREFIX


def app(owner: str = "alice") -> Permissions:
    return application_permissions(owner, STREAM, RESERVED)


def ev(owner: str, device: str = "d1", kind: str = "resource-changed", href: str = "/a") -> str:
    return subjects.event_subject(owner, device, kind, href)


# -- the matcher the tests rely on ---------------------------------------------------------------


def test_the_matcher() -> None:
    assert covers("a.*.c", "a.b.c")
    assert not covers("a.*.c", "a.b.d")
    assert not covers("a.*", "a.b.c")
    assert covers("a.>", "a.b.c")
    assert covers("a.>", "a.b")
    assert not covers("a.>", "a")
    assert not covers("a.b", "a.b.c")
    assert not covers("a.b.c", "a.b")
    assert covers("a.>", "a.*")
    assert covers("a.>", "a.>")
    assert not covers("a.b.>", "a.>")
    assert not covers("a.b.>", "a.*.c")
    assert covers("a.*.>", "a.*.c")
    assert not covers("a.*", "a.>")
    assert permitted(["a.>"], ["a.x"], "a.y")
    assert not permitted(["a.>"], ["a.x"], "a.x")
    assert permitted([], ["a.x"], "b")
    assert not permitted([], [">"], "b")
    assert not may_publish(Permissions(sub_allow=("x",)), "x")
    assert may_publish(Permissions(unrestricted=True), "anything.at.all")


# -- applications -------------------------------------------------------------------------------


def test_app_may_call_the_command_api() -> None:
    p = app()
    for op in api.REQUEST_TYPES:
        assert may_publish(p, f"{api.API_PREFIX}.{op}")
    assert f"{api.API_PREFIX}.>" == API_SUBJECTS


@pytest.mark.parametrize("owner", ["alice", "bob"])
def test_app_never_publishes_into_the_log(owner: str) -> None:
    p = app("alice")
    for subject in (
        ev(owner),
        ev(owner, kind="command-pending", href="/light"),
        subjects.event_subject(owner, "d1", "device-registered"),
        "twinhub.ev.alice",
        "twinhub.ev.x.y.z.w",
    ):
        assert not may_publish(p, subject), subject


@pytest.mark.parametrize("prefix", [JS, "$JS.API"])
@pytest.mark.parametrize(
    "op",
    [
        f"STREAM.CREATE.{STREAM}",
        f"STREAM.UPDATE.{STREAM}",
        f"STREAM.DELETE.{STREAM}",
        f"STREAM.PURGE.{STREAM}",
        f"STREAM.INFO.{STREAM}",
        f"STREAM.MSG.GET.{STREAM}",
        f"STREAM.MSG.DELETE.{STREAM}",
        f"STREAM.SNAPSHOT.{STREAM}",
        "STREAM.NAMES",
        "STREAM.LIST",
        f"DIRECT.GET.{STREAM}",
        f"DIRECT.GET.{STREAM}.twinhub.ev.alice.d1.resource-changed./a",
        f"DIRECT.GET.{STREAM}.twinhub.ev.bob.d1.resource-changed./a",
        f"CONSUMER.LIST.{STREAM}",
        f"CONSUMER.NAMES.{STREAM}",
        f"CONSUMER.DURABLE.CREATE.{STREAM}.app_x",
        "INFO",
        "ACCOUNT.PURGE.APPS",
        f"CONSUMER.CREATE.{STREAM}.app_x",  # no filter: could read every owner
        f"CONSUMER.CREATE.{STREAM}.app_x.twinhub.ev.bob.>",
        f"CONSUMER.CREATE.{STREAM}.app_x.twinhub.ev.*.>",
        f"CONSUMER.CREATE.{STREAM}.app_x.twinhub.ev.>",
        f"CONSUMER.CREATE.{STREAM}.app_x.twinhub.ev.alice",
        "CONSUMER.CREATE.OTHER_STREAM.app_x.twinhub.ev.alice.>",
        "CONSUMER.MSG.NEXT.OTHER_STREAM.app_x",
    ],
)
def test_app_has_no_stream_ops_direct_gets_or_consumer_listing(prefix: str, op: str) -> None:
    assert not may_publish(app(), f"{prefix}.{op}")


@pytest.mark.parametrize(
    "op",
    [
        f"CONSUMER.CREATE.{STREAM}.app_x.twinhub.ev.alice.>",
        f"CONSUMER.CREATE.{STREAM}.app_x.twinhub.ev.alice.d1.>",
        f"CONSUMER.CREATE.{STREAM}.app_x.twinhub.ev.alice.d1.resource-changed./a",
        f"CONSUMER.MSG.NEXT.{STREAM}.app_x",
        f"CONSUMER.INFO.{STREAM}.app_x",
        f"CONSUMER.DELETE.{STREAM}.app_x",
    ],
)
def test_app_uses_consumers_of_its_own_events(op: str) -> None:
    assert may_publish(app(), f"{JS}.{op}")
    assert not may_publish(app(), f"$JS.API.{op}")  # only through the import prefix


def test_app_acknowledges_its_consumers_messages() -> None:
    assert may_publish(app(), f"$JS.ACK.{STREAM}.app_x.1.10.3.1700000000000000000.0")
    assert not may_publish(app(), "$JS.ACK.OTHER.app_x.1.10.3.1700000000000000000.0")


@pytest.mark.parametrize("name", RESERVED)
def test_reserved_consumers_are_out_of_an_apps_reach(name: str) -> None:
    p = app()
    for subject in (
        f"{JS}.CONSUMER.CREATE.{STREAM}.{name}.twinhub.ev.alice.>",
        f"{JS}.CONSUMER.CREATE.{STREAM}.{name}.twinhub.ev.alice.d1.resource-changed./a",
        f"{JS}.CONSUMER.MSG.NEXT.{STREAM}.{name}",
        f"{JS}.CONSUMER.INFO.{STREAM}.{name}",
        f"{JS}.CONSUMER.DELETE.{STREAM}.{name}",
        f"$JS.ACK.{STREAM}.{name}.1.10.3.1700000000000000000.0",
    ):
        assert not may_publish(p, subject), subject
    # the same operations on an ordinary name are allowed: the denial is the name's
    assert may_publish(p, f"{JS}.CONSUMER.MSG.NEXT.{STREAM}.{name}x")


def test_app_hears_only_its_own_events_and_inbox() -> None:
    p = app()
    inbox = subjects.owner_inbox_prefix("alice")
    assert inbox == "_INBOX.alice"
    for subject in (
        ev("alice"),
        "twinhub.ev.alice.>",
        "twinhub.ev.alice.*.resource-changed.>",
        f"{inbox}.abc",
        f"{inbox}.>",
    ):
        assert may_subscribe(p, subject), subject
    for subject in (
        ev("bob"),
        "twinhub.ev.>",
        "twinhub.ev.*.d1.>",
        "twinhub.ev.*.>",
        "twinhub.ev.alice",
        "twinhub.ev.alicex.d1.resource-changed./a",
        "_INBOX.>",
        "_INBOX.bob.abc",
        "_INBOX.alicex.abc",
        "_INBOX.*.abc",
        "_INBOX.abc",
        inbox,
        f"{api.API_PREFIX}.update",
        CALLOUT_SUBJECT,
        ">",
        "$JS.API.>",
        f"$JS.ACK.{STREAM}.app_x.1.10.3.1700000000000000000.0",
    ):
        assert not may_subscribe(p, subject), subject


def test_apps_of_two_owners_share_nothing() -> None:
    alice, bob = app("alice"), app("bob")
    assert not may_subscribe(alice, ev("bob"))
    assert not may_subscribe(bob, ev("alice"))
    assert not may_publish(alice, f"{JS}.CONSUMER.CREATE.{STREAM}.x.twinhub.ev.bob.>")
    assert may_publish(bob, f"{JS}.CONSUMER.CREATE.{STREAM}.x.twinhub.ev.bob.>")


@pytest.mark.parametrize(
    ("owner", "other"),
    [
        ("alice.>", "alice"),
        ("alice.*", "alice"),
        (">", "bob"),
        ("*", "bob"),
        ("a.b c", "a"),
        ("a.b c", "b c"),
        ("ünï", "bob"),
    ],
)
def test_an_owner_cannot_widen_its_subjects(owner: str, other: str) -> None:
    p = app(owner)
    tok = subjects.escape_token(owner)
    assert subjects.is_valid_subject(f"x.{tok}.y")
    assert not {".", "*", ">", " "} & set(tok)
    for subject in (ev(other), f"_INBOX.{subjects.escape_token(other)}.x", "_INBOX.x"):
        assert not may_subscribe(p, subject), subject
    assert not may_publish(p, f"{JS}.CONSUMER.CREATE.{STREAM}.x.{subjects.event_filter(other)}")
    # the owner's own subjects, escaped, are still usable
    assert may_subscribe(p, ev(owner))
    assert may_publish(p, f"{JS}.CONSUMER.CREATE.{STREAM}.x.{subjects.event_filter(owner)}")


def test_no_permissions_for_an_empty_owner() -> None:
    with pytest.raises(SubjectError):
        app("")


@pytest.mark.parametrize("owner", ["a.b c", "ünï", "alice.>", "*", "x~2Ey"])
def test_permissions_of_an_odd_owner_are_the_plain_ones_with_its_escaped_token(owner: str) -> None:
    """Every pattern is the plain owner's with the owner's position replaced by one token."""
    tok = subjects.escape_token(owner)
    plain = app("PLAIN")
    odd = app(owner)

    def plainly(patterns: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(".".join("PLAIN" if t == tok else t for t in p.split(".")) for p in patterns)

    assert plainly(odd.pub_allow) == plain.pub_allow
    assert plainly(odd.pub_deny) == plain.pub_deny
    assert plainly(odd.sub_allow) == plain.sub_allow
    assert odd.sub_deny == plain.sub_deny == ()


def test_app_is_not_a_responder_nor_unrestricted() -> None:
    p = app()
    assert not p.responses
    assert not p.unrestricted


# -- services -----------------------------------------------------------------------------------


def svc(role: Role, stream: str = STREAM) -> Permissions:
    assert role in ROLES
    return service_permissions(role, stream, PROJECTOR)


@pytest.mark.parametrize("role", ["gateway", "twin"])
def test_services_append_and_read(role: Role) -> None:
    p = svc(role)
    assert may_publish(p, ev("alice"))
    assert may_publish(p, ev("bob", kind="command-pending"))
    for op in (
        "INFO",
        f"STREAM.INFO.{STREAM}",
        f"STREAM.MSG.GET.{STREAM}",
        f"DIRECT.GET.{STREAM}",
        f"DIRECT.GET.{STREAM}.twinhub.ev.alice.d1.resource-changed./a",
        f"CONSUMER.CREATE.{STREAM}.gw-1.twinhub.ev.*.d1.>",
        f"CONSUMER.CREATE.{STREAM}.gw-1",
        f"CONSUMER.INFO.{STREAM}.gw-1",
        f"CONSUMER.DELETE.{STREAM}.gw-1",
        f"CONSUMER.MSG.NEXT.{STREAM}.gw-1",
    ):
        assert may_publish(p, f"$JS.API.{op}"), op
    assert may_publish(p, f"$JS.ACK.{STREAM}.gw-1.1.10.3.1700000000000000000.0")
    assert may_subscribe(p, ev("alice"))
    assert may_subscribe(p, "twinhub.ev.>")
    assert may_subscribe(p, f"{inbox_prefix(role)}.xyz")
    assert not may_subscribe(p, "_INBOX.other.xyz")
    assert not may_subscribe(p, "_INBOX.>")


@pytest.mark.parametrize("role", ["gateway", "twin"])
@pytest.mark.parametrize("op", ["DELETE", "PURGE", "MSG.DELETE", "SNAPSHOT", "RESTORE"])
def test_no_service_deletes_or_purges_the_stream(role: Role, op: str) -> None:
    assert not may_publish(svc(role), f"$JS.API.STREAM.{op}.{STREAM}")


@pytest.mark.parametrize("op", ["CREATE", "UPDATE"])
def test_only_the_twin_provisions_the_stream(op: str) -> None:
    assert not may_publish(svc("gateway"), f"$JS.API.STREAM.{op}.{STREAM}")
    assert may_publish(svc("twin"), f"$JS.API.STREAM.{op}.{STREAM}")


def test_services_reach_only_their_stream() -> None:
    for role in ("gateway", "twin"):
        p = svc(role)
        for op in ("STREAM.INFO.OTHER", "STREAM.CREATE.OTHER", "CONSUMER.CREATE.OTHER.x"):
            assert not may_publish(p, f"$JS.API.{op}"), (role, op)
        # and a service configured for another stream reaches that one
        assert may_publish(svc(role, "OTHER"), "$JS.API.STREAM.INFO.OTHER")
        assert not may_publish(svc(role, "OTHER"), f"$JS.API.STREAM.INFO.{STREAM}")


def test_the_gateway_leaves_the_projectors_consumer_alone() -> None:
    p = svc("gateway")
    for subject in (
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{PROJECTOR}",
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{PROJECTOR}.twinhub.ev.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.{PROJECTOR}",
        f"$JS.API.CONSUMER.DELETE.{STREAM}.{PROJECTOR}",
        # pulling or acknowledging would take events away from the projector
        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{PROJECTOR}",
        f"$JS.ACK.{STREAM}.{PROJECTOR}.1.10.3.1700000000000000000.0",
    ):
        assert not may_publish(p, subject), subject


def test_the_twin_runs_the_projector_and_answers_the_api() -> None:
    p = svc("twin")
    for subject in (
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{PROJECTOR}.twinhub.ev.>",
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{PROJECTOR}",
        f"$JS.API.CONSUMER.INFO.{STREAM}.{PROJECTOR}",
        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{PROJECTOR}",
        f"$JS.ACK.{STREAM}.{PROJECTOR}.1.10.3.1700000000000000000.0",
    ):
        assert may_publish(p, subject), subject
    assert may_subscribe(p, API_SUBJECTS)
    assert may_subscribe(p, f"{api.API_PREFIX}.update")
    assert p.responses
    gateway = svc("gateway")
    assert not may_subscribe(gateway, f"{api.API_PREFIX}.update")
    assert not gateway.responses


@pytest.mark.parametrize("role", ["gateway", "twin"])
def test_services_are_not_the_callout(role: Role) -> None:
    assert not may_subscribe(svc(role), CALLOUT_SUBJECT)
    assert not svc(role).unrestricted


def test_the_callout_only_hears_authorization_requests() -> None:
    p = svc("callout")
    assert may_subscribe(p, CALLOUT_SUBJECT)
    assert CALLOUT_SUBJECT == "$SYS.REQ.USER.AUTH"
    for subject in ("$SYS.REQ.USER.>", "$SYS.>", ">", "twinhub.ev.>", "_INBOX.callout.x"):
        assert not may_subscribe(p, subject), subject
    for subject in (ev("alice"), "$SYS.REQ.USER.AUTH", f"{api.API_PREFIX}.update", "x"):
        assert not may_publish(p, subject), subject
    assert p.responses  # its answers go out as replies only
    assert not p.unrestricted


def test_admin_is_unrestricted() -> None:
    p = svc("admin")
    assert p.unrestricted
    assert may_publish(p, f"$JS.API.STREAM.DELETE.{STREAM}")


# -- gateway leases (proto.leases) --------------------------------------------------------------

LEASES = "TWINHUB_LEASES"


def test_the_lease_stream_is_the_protos() -> None:
    assert LEASE_STREAM == LEASES


def test_a_gateway_writes_only_its_lease_records() -> None:
    p = svc("gateway")
    assert may_publish(p, lease_subject(Writer.GATEWAY, "gw-1", "a1b2"))
    assert may_publish(p, lease_subject(Writer.GATEWAY, "gw-2", "c3d4"))  # supersede / any id
    assert not may_publish(p, lease_subject(Writer.TWIN, "gw-1", "a1b2"))  # claims: the twin's
    assert not may_publish(p, "twinhub.lease.other.gw-1.a1b2")


def test_the_twin_writes_only_claims() -> None:
    p = svc("twin")
    assert may_publish(p, lease_subject(Writer.TWIN, "gw-1", "a1b2"))
    assert not may_publish(p, lease_subject(Writer.GATEWAY, "gw-1", "a1b2"))


@pytest.mark.parametrize("role", ["gateway", "twin"])
def test_services_read_the_leases(role: Role) -> None:
    p = svc(role)
    for op in (
        f"STREAM.INFO.{LEASES}",
        f"STREAM.MSG.GET.{LEASES}",
        f"DIRECT.GET.{LEASES}",
        f"CONSUMER.CREATE.{LEASES}.r1.twinhub.lease.>",
        f"CONSUMER.MSG.NEXT.{LEASES}.r1",
        f"CONSUMER.DELETE.{LEASES}.r1",
    ):
        assert may_publish(p, f"$JS.API.{op}"), op
    for op in ("DELETE", "PURGE", "MSG.DELETE"):
        assert not may_publish(p, f"$JS.API.STREAM.{op}.{LEASES}"), op


@pytest.mark.parametrize("op", ["CREATE", "UPDATE"])
def test_only_the_twin_provisions_the_lease_stream(op: str) -> None:
    assert not may_publish(svc("gateway"), f"$JS.API.STREAM.{op}.{LEASES}")
    assert may_publish(svc("twin"), f"$JS.API.STREAM.{op}.{LEASES}")


def test_applications_get_nothing_of_the_leases() -> None:
    p = app()
    for subject in (
        "twinhub.lease.gw.gw-1.a1",
        "twinhub.lease.twin.gw-1.a1",
        f"{JS}.DIRECT.GET.{LEASES}",
        f"{JS}.STREAM.INFO.{LEASES}",
        f"{JS}.CONSUMER.CREATE.{LEASES}.x.twinhub.lease.>",
        f"$JS.API.DIRECT.GET.{LEASES}",
    ):
        assert not may_publish(p, subject), subject
    assert not may_subscribe(p, "twinhub.lease.>")
