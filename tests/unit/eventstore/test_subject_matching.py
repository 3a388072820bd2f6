"""The subject matcher the in-memory store uses, against a regex reference of the NATS rules."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from eventstore.memory import subject_matches
from eventstore.ports import is_filter_subject, is_literal_subject

literal_tokens = st.sampled_from(["a", "b", "ab", "dev-1", "/oic/d", "~2E"])
subjects = st.lists(literal_tokens, min_size=1, max_size=6).map(".".join)
filters = st.builds(
    lambda toks, tail: ".".join(toks + ([">"] if tail else [])),
    st.lists(st.one_of(literal_tokens, st.just("*")), min_size=0, max_size=6),
    st.booleans(),
).filter(bool)


def reference(filter_subject: str, subject: str) -> bool:
    parts = []
    for tok in filter_subject.split("."):
        if tok == "*":
            parts.append(r"[^.]+")
        elif tok == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(tok))
    return re.fullmatch(r"\.".join(parts), subject) is not None


@given(filters, subjects)
def test_matches_like_the_reference(filter_subject: str, subject: str) -> None:
    assert is_filter_subject(filter_subject)
    assert is_literal_subject(subject)
    assert subject_matches(filter_subject, subject) == reference(filter_subject, subject)


@given(subjects)
def test_a_subject_matches_itself_and_the_full_wildcard(subject: str) -> None:
    assert subject_matches(subject, subject)
    assert subject_matches(">", subject)
    assert subject_matches(".".join("*" for _ in subject.split(".")), subject)


def test_examples_from_the_subject_grammar() -> None:
    s = "twinhub.ev.alice.d1.resource-changed./oic/d"
    assert subject_matches("twinhub.ev.>", s)
    assert subject_matches("twinhub.ev.*.d1.>", s)
    assert subject_matches("twinhub.ev.alice.*.resource-changed.>", s)
    assert not subject_matches("twinhub.ev.*.d2.>", s)
    assert not subject_matches("twinhub.ev.alice.d1.resource-changed./oic/d.>", s)
    assert not subject_matches("twinhub.ev.alice.d1.resource-changed", s)
    assert not subject_matches("twinhub.>", "twinhub")


def test_subject_validation() -> None:
    assert is_literal_subject("a.b.c")
    for bad in ("", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a.\tb"):
        assert not is_literal_subject(bad), bad
    assert is_filter_subject("a.*.>")
    for bad in ("", "a..b", "a.>.b", "a b"):
        assert not is_filter_subject(bad), bad
