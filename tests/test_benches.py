"""Every benchmark runs in its quick mode, so none rots: exit 0 and one JSON document on stdout
with the machine described. The figures of a quick run mean nothing and are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted(p.name for p in (ROOT / "bench").glob("*_bench.py"))
# run in quick mode by a test of their own below, which checks more than the machine
OWN_TEST = {"wire_baselines_bench.py"}

pytestmark = pytest.mark.servers


def test_every_bench_is_listed_here() -> None:
    assert BENCHES == [
        "append_bench.py",
        "bus_bench.py",
        "command_bench.py",
        "e2e_bench.py",
        "kinds_bench.py",
        "read_bench.py",
        "rebuild_bench.py",
        "store_bench.py",
        "udp_bench.py",
        "wire_baselines_bench.py",
        "wire_bench.py",
        "writes_bench.py",
    ]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("bench", [b for b in BENCHES if b not in OWN_TEST])
def test_bench_runs_quick(bench: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / bench), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert isinstance(result, dict)
    assert "machine" in result, sorted(result)


@pytest.mark.timeout(400)
def test_fault_suite_quick_finds_no_violation() -> None:
    """``bench/faults.py --quick``: every component killed under load, the gateway left down
    past its lease, commands across the twin and gateway kills; it must find nothing (no
    acknowledged value lost, no duplicate, no reordering, converged twins, a gap-free live
    subscription, offline within the lease, every command ended once). A violation fails this
    test: the suite is a real test."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "faults.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    assert proc.stdout.strip(), proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert "machine" in result, sorted(result)
    summary = result.get("summary", {})
    assert summary.get("ok") is True, json.dumps(
        {
            "summary": summary,
            "violated": {
                name: {c: v for c, v in exp.get("checks", {}).items() if not v["ok"]}
                or exp.get("failed")
                for name, exp in result.get("experiments", {}).items()
            },
        },
        indent=1,
    )[:6000]
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.timeout(200)
def test_soak_quick_samples_every_process_and_its_watch_misses_nothing() -> None:
    """``bench/soak.py --quick``: the whole system as processes under steady load, sampled; the
    run fails (exit 1) when the watch did not print exactly its device's events in order or the
    log took less than half of the offered load. The 5 % growth goal is the hour-long run's."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    soak = json.loads(proc.stdout)["soak"]
    assert soak["watch"]["printed"] == soak["watch"]["logged"] > 0
    growth = soak["growth_after_warmup"]
    for name in ("nats-server", "mongo-server", "gateway", "twin", "callout", "watch"):
        assert growth[name]["rss_kb"]["samples"] >= 4, name
        assert growth[name]["open_files"]["first"] > 0, name


@pytest.mark.timeout(400)
def test_wire_baselines_quick_measures_every_target() -> None:
    """``bench/wire_baselines_bench.py --quick``: the gateway and the three baseline servers of
    ``bench/baseline_servers.py`` each get the same signed-in fleet, every device observed (its
    notifications counted), and report CPU per notification, memory per idle device and the
    gateway's ratios over each baseline."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "wire_baselines_bench.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert "machine" in result, sorted(result)
    targets = ("gateway", "aiocoap", "lean", "wire")
    assert tuple(result["targets"]) == targets
    devices = result["settings"]["devices"]
    for name in targets:
        t = result["targets"][name]
        assert t["memory"]["signed_in"] == devices, name
        assert isinstance(t["memory"]["kb_per_idle_device"], float), name
        (step,) = t["ingest"]
        assert step["received_per_s"] > 0, name
        assert step["cpu_us_per_notification"] > 0, name
    summary = result["summary"]
    assert set(summary["cpu_us_per_notification"]) == set(targets)
    assert set(summary["kb_per_idle_device"]) == set(targets)
    for name in ("aiocoap", "lean", "wire"):
        ratio = summary["ratios"][f"gateway_over_{name}"]
        assert set(ratio) == {"cpu_per_notification", "kb_per_idle_device"}
        assert all(v is not None and v > 0 for v in ratio["cpu_per_notification"].values())
