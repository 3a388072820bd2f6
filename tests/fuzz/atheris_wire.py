"""libFuzzer (atheris) harness over ``CoapTcpConnection.receive_data`` (see :mod:`wire_check`).

By hand, from the repository root (crashes go to ``crash-*`` files, which belong in
``tests/fuzz/corpus/`` once fixed)::

    mkdir -p /tmp/wire && .venv/bin/python tests/fuzz/atheris_wire.py /tmp/wire \\
        tests/fuzz/corpus -runs=1000000

The first input byte picks the chunk size the stream is fed in.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["gateway.wire", "gateway.adapters.coap_frames"]):
    import wire_check


def test_one_input(data: bytes) -> None:
    if data:
        wire_check.check(data[1:], data[0] % 32 + 1)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
