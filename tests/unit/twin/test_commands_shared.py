"""Shared attributes of simple devices through the command API's decisions: desired state on
``/shared/<key>`` whose content is the attribute's value, any JSON value but null."""

from __future__ import annotations

from typing import Any

import pytest

from proto import api
from proto import events as ev
from twin.commands import Record

from .test_commands_rpc import bad_request, decide, ocf, simple


def shared(href: str, content: Any) -> api.SetDesired:
    return api.SetDesired(device_id="d1", href=href, content=content)


@pytest.mark.parametrize("value", [25, 21.5, "eco", True, [1, 2], {"on": "07:00"}])
def test_a_shared_attribute_takes_any_json_value(value: Any) -> None:
    decision = decide(shared("/shared/target", value), simple())
    assert isinstance(decision, Record)
    (set_,) = decision.events
    assert isinstance(set_.data, ev.DesiredSet)
    assert (set_.data.href, set_.data.content, set_.data.version) == ("/shared/target", value, 1)


def test_a_shared_attribute_is_never_null_and_has_a_key() -> None:
    assert "null" in bad_request(decide(shared("/shared/target", None), simple()))
    assert "<key>" in bad_request(decide(shared("/shared/", 1), simple()))


@pytest.mark.parametrize("value", [25, "on", [1], None])
def test_other_desired_content_is_an_object(value: Any) -> None:
    assert "JSON object" in bad_request(decide(shared("/light/1", value), ocf()))
    assert "JSON object" in bad_request(decide(shared("/light/1", value), simple()))


def test_an_ocf_device_has_no_shared_attributes_of_scalars() -> None:
    assert "simple device" in bad_request(decide(shared("/shared/target", 25), ocf()))
    assert isinstance(decide(shared("/shared/target", {"v": 25}), ocf()), Record)
