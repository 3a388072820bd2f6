"""A bounded atheris run of ``atheris_frames.py`` (skipped where atheris is not installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HERE = Path(__file__).parent


def test_atheris_frames_smoke(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus", corpus)  # libFuzzer adds what it finds to the first dir
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "atheris_frames.py"),
            str(corpus),
            "-max_total_time=2",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert done.returncode == 0, f"{crashes}\n{done.stderr[-3000:]}"
    assert "Done" in done.stderr
