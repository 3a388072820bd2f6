"""The gateway reaper's counts on the twin's /metrics (twinhub_cli.observability)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from eventstore.memory import InMemoryEventStore
from proto.leases import LeaseState
from twin.reaper import ReaperStats
from twin.service import ProjectorStats
from twinhub_cli.observability import ApiMetrics, Heartbeat, LogHead, Prober, TwinCollector


@dataclass
class FakeProjector:
    stats: ProjectorStats = field(default_factory=ProjectorStats)
    config: Any = field(default_factory=lambda: SimpleNamespace(name="p", filter_subject=">"))


def test_the_reaper_is_scraped_with_the_twin() -> None:
    metrics = ApiMetrics()
    stats = ReaperStats(
        instances={**dict.fromkeys(LeaseState, 0), LeaseState.HELD: 3, LeaseState.REAPED: 2},
        lost_total=2,
        devices_offline_total=17,
        poll_failures_total=1,
    )
    metrics.reaper = SimpleNamespace(stats=stats)  # type: ignore[assignment]
    registry = CollectorRegistry()
    projector: Any = FakeProjector()
    registry.register(
        TwinCollector(
            projector, LogHead(InMemoryEventStore()), metrics, Heartbeat(), Prober({}), lambda: True
        )
    )
    text = generate_latest(registry).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert got[("twinhub_twin_gateway_instances", (("state", "held"),))] == 3
    assert got[("twinhub_twin_gateway_instances", (("state", "reaped"),))] == 2
    assert got[("twinhub_twin_gateway_instances", (("state", "reaping"),))] == 0
    assert got[("twinhub_twin_gateways_lost_total", ())] == 2
    assert got[("twinhub_twin_gateway_lost_offline_total", ())] == 17
    assert got[("twinhub_twin_lease_poll_failures_total", ())] == 1
