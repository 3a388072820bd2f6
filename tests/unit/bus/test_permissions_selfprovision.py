"""Who may do what with self-provisioning on the bus (``twinhub.svc.provision``): the gateway
relays (publishes), the twin service answers (subscribes, replies as a responder), applications
reach nothing of it. Checked with NATS's matching rules (tests/unit/bus/matching.py)."""

from __future__ import annotations

from bus.permissions import (
    SELF_PROVISION,
    Permissions,
    app_imports,
    application_permissions,
    inbox_prefix,
    service_permissions,
)
from proto.selfprovision import SUBJECT

from .matching import covers, may_publish, may_subscribe

STREAM = "TWINHUB_EVENTS"


def svc(role: str) -> Permissions:
    return service_permissions(role, STREAM, "twin-projector")  # type: ignore[arg-type]


def test_the_subject_is_the_protos() -> None:
    assert SELF_PROVISION == SUBJECT == "twinhub.svc.provision"


def test_the_gateway_relays_and_hears_the_answer_on_its_inbox() -> None:
    gateway = svc("gateway")
    assert may_publish(gateway, SUBJECT)
    assert may_subscribe(gateway, f"{inbox_prefix('gateway')}.abc.1")
    assert not may_subscribe(gateway, SUBJECT)  # cannot answer in the twin's place
    assert not gateway.responses


def test_the_twin_answers_and_never_asks() -> None:
    twin = svc("twin")
    assert may_subscribe(twin, SUBJECT)
    assert twin.responses
    assert not may_publish(twin, SUBJECT)


def test_no_wider_grant_than_the_subject() -> None:
    for role in ("gateway", "twin"):
        p = svc(role)
        assert not may_publish(p, "twinhub.svc.other")
        assert not may_subscribe(p, "twinhub.svc.>")
        assert not may_subscribe(p, "twinhub.svc.other")


def test_the_callout_and_applications_get_nothing_of_it() -> None:
    callout = svc("callout")
    assert not may_publish(callout, SUBJECT) and not may_subscribe(callout, SUBJECT)
    app = application_permissions("alice", STREAM, ("twin-projector",))
    assert not may_publish(app, SUBJECT)
    assert not may_subscribe(app, SUBJECT)
    for _, subject, _ in app_imports(STREAM):
        assert not covers(subject, SUBJECT), subject  # APPS imports none of it
