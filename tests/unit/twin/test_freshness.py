"""The twin never replaces newer content with older (issue 11, item 1, defence in depth):
RFC 7641's freshness rule per connection, newer connections first."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from proto import events as ev
from proto.events import AnyEvent
from twin.fold import fold_all
from twin.freshness import FRESHNESS_WINDOW, OBSERVE_MODULUS, observe_fresh
from twin.model import Twin

from .factory import T0, event, online

HALF = OBSERVE_MODULUS // 2
values = st.integers(0, OBSERVE_MODULUS - 1)
ahead = st.integers(1, HALF - 1)  # how far a newer number is ahead, modulo 2**24
within = st.integers(0, int(FRESHNESS_WINDOW.total_seconds() * 1000)).map(
    lambda ms: timedelta(milliseconds=ms)
)


# --------------------------------------------------------------------------- the rule


@given(values, ahead, within)
def test_a_number_ahead_by_less_than_half_the_space_is_newer(v: int, d: int, dt: timedelta) -> None:
    newer = (v + d) % OBSERVE_MODULUS
    assert observe_fresh(v, T0, newer, T0 + dt)
    assert not observe_fresh(newer, T0, v, T0 + dt), "and the older one is not"


@given(values, within)
def test_the_same_number_is_not_newer_within_128_seconds(v: int, dt: timedelta) -> None:
    assert not observe_fresh(v, T0, v, T0 + dt)


@given(values, values, st.integers(1, 10**6).map(lambda ms: timedelta(milliseconds=ms)))
def test_anything_is_newer_after_128_seconds(v1: int, v2: int, extra: timedelta) -> None:
    assert observe_fresh(v1, T0, v2, T0 + FRESHNESS_WINDOW + extra)


@given(values, values)
def test_of_two_numbers_not_half_the_space_apart_exactly_one_is_newer(v1: int, v2: int) -> None:
    if v1 == v2 or (v1 - v2) % OBSERVE_MODULUS == HALF:
        return
    assert observe_fresh(v1, T0, v2, T0) != observe_fresh(v2, T0, v1, T0)


@given(values, values, st.integers(-3, 3))
def test_numbers_count_modulo_2_to_the_24(v1: int, v2: int, k: int) -> None:
    assert observe_fresh(v1, T0, v2, T0) == observe_fresh(v1, T0, v2 + k * OBSERVE_MODULUS, T0)


def test_the_examples_of_the_wrap_around() -> None:
    top = OBSERVE_MODULUS - 1
    assert observe_fresh(top, T0, 0, T0), "0 follows 2**24 - 1"
    assert not observe_fresh(0, T0, top, T0)
    assert observe_fresh(5, T0, 5 + HALF - 1, T0)
    assert not observe_fresh(5, T0, 5 + HALF + 1, T0), "more than half ahead is behind"
    assert not observe_fresh(9, T0, 3, T0 + FRESHNESS_WINDOW), "128 s exactly: not yet"


# --------------------------------------------------------------------------- through the fold


def report(
    content: object, seq: int | None, conn: str = "c1", href: str = "/light/1"
) -> ev.ResourceChanged:
    return ev.ResourceChanged(href=href, content=content, observe_seq=seq, connection_id=conn)


def shown(twin: Twin | None, href: str = "/light/1") -> object:
    assert twin is not None
    r = twin.resource(href)
    return None if r is None else r.content


def log_of(*items: tuple[ev.EventData, float]) -> list[AnyEvent]:
    """Events at positions 1.. at the given seconds after T0."""
    return [
        event(data, i, time=T0 + timedelta(seconds=sec))
        for i, (data, sec) in enumerate(items, start=1)
    ]


def test_the_defect_of_issue_11_the_older_first_response_after_a_notification() -> None:
    twin = fold_all(
        None,
        log_of(
            (online("c1"), 0),
            (report({"seq": 1}, 1), 1),  # the notification appended first
            (report({"seq": 0}, 0), 1),  # then the first response it followed on the wire
        ),
    )
    assert shown(twin) == {"seq": 1}
    assert twin is not None
    assert (twin.position, twin.version) == (3, 3), "an ignored report still advances"


@given(values, st.lists(st.integers(1, 1000), min_size=1, max_size=8), st.data())
def test_one_connections_reports_in_any_log_order_leave_the_newest(
    start: int, steps: list[int], data: st.DataObject
) -> None:
    """Numbers from anywhere in the space (wrapping included), within 128 s."""
    seqs = [start]
    for d in steps:
        seqs.append((seqs[-1] + d) % OBSERVE_MODULUS)
    order = data.draw(st.permutations(range(len(seqs))))
    reports = [(report({"n": i}, seqs[i]), 1.0 + i / 10) for i in order]
    twin = fold_all(None, log_of((online("c1"), 0), *reports))
    assert shown(twin) == {"n": len(seqs) - 1}


def test_after_128_seconds_a_lower_number_is_newer() -> None:
    twin = fold_all(
        None,
        log_of((online("c1"), 0), (report("a", 900), 1), (report("b", 3), 130)),
    )
    assert shown(twin) == "b"


def test_a_newer_connection_wins_and_a_late_report_of_the_older_one_changes_nothing() -> None:
    twin = fold_all(
        None,
        log_of(
            (online("c1"), 0),
            (report("old", 50, "c1"), 1),
            (online("c2"), 2),
            (report("new", 0, "c2"), 3),  # a lower number, but of the newer connection
            (report("late", 51, "c1"), 4),  # the replaced connection's writer drained late
        ),
    )
    assert shown(twin) == "new"


def test_a_late_report_of_a_replaced_connection_is_ignored_even_before_the_new_one_reported() -> (
    None
):
    """The new connection found the content unchanged (it appended nothing): what the older
    connection still had in flight is older than what the device showed the new one."""
    twin = fold_all(
        None,
        log_of(
            (online("c1"), 0),
            (report("on", 1, "c1"), 1),
            (online("c2"), 2),
            (report("off", 2, "c1"), 3),
        ),
    )
    assert shown(twin) == "on"


def test_a_late_report_of_an_older_connection_fills_a_resource_the_twin_lacks() -> None:
    twin = fold_all(
        None,
        log_of((online("c1"), 0), (online("c2"), 1), (report("x", 4, "c1", "/b"), 2)),
    )
    assert shown(twin, "/b") == "x"


def test_reports_without_an_observe_number_are_taken_in_log_order() -> None:
    log = log_of(
        (online("c1"), 0),
        (report("observed", 7), 1),
        (report("read", None), 2),  # a one-shot read, an error status...
        (report("next", 2), 3),
    )
    assert shown(fold_all(None, log[:3])) == "read"
    assert shown(fold_all(None, log)) == "next", "after an unnumbered report, the next is taken"


def test_reports_without_a_connection_are_taken_in_log_order() -> None:
    twin = fold_all(
        None,
        log_of((online("c1"), 0), (report("a", 9), 1), (report("b", 3, conn=""), 2)),
    )
    assert shown(twin) == "b"
    no_connection = fold_all(None, log_of((report("a", 9), 1), (report("b", 3), 2)))
    assert shown(no_connection) == "b", "a twin with no known connection: log order"


def test_the_resource_remembers_its_connection() -> None:
    twin = fold_all(None, log_of((online("c1"), 0), (report("a", 9), 1)))
    assert twin is not None
    r = twin.resource("/light/1")
    assert r is not None
    assert (r.connection_id, r.observe_seq) == ("c1", 9)
    doc = r.to_document()
    assert doc["connection_id"] == "c1"
    del doc["connection_id"]  # a document stored before the field existed
    assert type(r).from_document(doc).connection_id == ""
