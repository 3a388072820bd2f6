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

pytestmark = pytest.mark.servers


def test_every_bench_is_listed_here() -> None:
    assert BENCHES == [
        "append_bench.py",
        "bus_bench.py",
        "command_bench.py",
        "e2e_bench.py",
        "kinds_bench.py",
        "read_bench.py",
    ]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("bench", BENCHES)
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
