from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto import subjects
from proto.errors import SubjectError

any_text = st.text(min_size=1, max_size=60)
kinds = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)


@given(st.text(max_size=80))
def test_escape_round_trips_and_yields_a_valid_token(value: str) -> None:
    token = subjects.escape_token(value)
    assert subjects.unescape_token(token) == value
    assert subjects.is_valid_subject("a." + token + ".b")
    assert "." not in token
    assert "*" not in token
    assert ">" not in token
    assert not any(c.isspace() for c in token)


@given(st.text(max_size=30), st.text(max_size=30))
def test_escape_is_injective(a: str, b: str) -> None:
    if a != b:
        assert subjects.escape_token(a) != subjects.escape_token(b)


_SAFE_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_/:=@+,"


def _escape_bytewise(value: str) -> str:
    """The definition (module doc): every byte outside the safe set becomes ``~XX``."""
    if value == "":
        return "~"
    return "".join(chr(b) if b in _SAFE_BYTES else f"~{b:02X}" for b in value.encode("utf-8"))


@given(st.text(max_size=40) | st.text(alphabet=_SAFE_BYTES.decode() + "~. é\n", max_size=40))
def test_escape_is_the_bytewise_definition(value: str) -> None:
    assert subjects.escape_token(value) == _escape_bytewise(value)


@pytest.mark.parametrize("code_point", range(0x300))
def test_escape_of_every_low_character(code_point: int) -> None:
    for value in (chr(code_point), "a" + chr(code_point) + "b"):
        assert subjects.escape_token(value) == _escape_bytewise(value)


@given(any_text, any_text, kinds, st.one_of(st.none(), any_text))
def test_event_subject_round_trips(owner: str, device: str, kind: str, res: str | None) -> None:
    subject = subjects.event_subject(owner, device, kind, res)
    assert subjects.is_valid_subject(subject)
    assert subject.count(".") == 5
    parsed = subjects.parse_event_subject(subject)
    assert (parsed.owner, parsed.device, parsed.kind, parsed.resource) == (owner, device, kind, res)
    assert str(parsed) == subject


def test_plain_ids_and_hrefs_stay_readable() -> None:
    s = subjects.event_subject(
        "alice", "0c0e5a3e-7a3f-4b3d-8c5c-6f1b2e4a9d10", "resource-changed", "/oic/d"
    )
    assert s == "twinhub.ev.alice.0c0e5a3e-7a3f-4b3d-8c5c-6f1b2e4a9d10.resource-changed./oic/d"
    dotted = subjects.event_subject("a.b", "d", "device-online")
    assert dotted == "twinhub.ev.a~2Eb.d.device-online._"


def test_filters() -> None:
    assert subjects.event_filter() == "twinhub.ev.>"
    assert subjects.event_filter(owner="alice") == "twinhub.ev.alice.>"
    assert subjects.device_scope("d1") == "twinhub.ev.*.d1.>"
    assert subjects.event_filter(owner="o", kind="resource-changed") == (
        "twinhub.ev.o.*.resource-changed.>"
    )
    assert subjects.event_filter("o", "d", "resource-changed", "/a") == (
        "twinhub.ev.o.d.resource-changed./a"
    )
    for f in ("twinhub.ev.>", "twinhub.ev.*.d1.>", "twinhub.ev.o.*.resource-changed.>"):
        assert subjects.is_valid_subject(f, wildcards=True)
        assert not subjects.is_valid_subject(f)


@pytest.mark.parametrize(
    "bad",
    [
        "twinhub.ev.o.d.k",
        "other.ev.o.d.k._",
        "twinhub.ev.o.d.K._",
        "twinhub.ev.o.d.k.~zz",
        "twinhub.ev.o.d.k.a b",
        "twinhub.ev.o.d.k._.x",
    ],
)
def test_parse_rejects_malformed_subjects(bad: str) -> None:
    with pytest.raises(SubjectError):
        subjects.parse_event_subject(bad)


@pytest.mark.parametrize(("owner", "device"), [("", "d"), ("o", ""), ("o" * 2000, "d")])
def test_build_rejects_empty_or_huge_tokens(owner: str, device: str) -> None:
    with pytest.raises(SubjectError):
        subjects.event_subject(owner, device, "device-online")


def test_invalid_kind_rejected() -> None:
    with pytest.raises(SubjectError):
        subjects.event_subject("o", "d", "Resource.Changed")


def test_unescape_rejects_non_utf8() -> None:
    with pytest.raises(SubjectError):
        subjects.unescape_token("~FF")
