"""The listings' output (twinhub_cli.listing): identifiers are never cut, on a terminal of any
width or in a pipe; ``-o table|wide|json`` and ``--json``."""

from __future__ import annotations

import argparse
import io
import re

import pytest

from twinhub_cli.listing import Column, add_output_options, print_table

ID = "850faf5f-e543-4b4e-9a0c-3c1f0a6d2b7e"
OTHER = "0c1f0a6d-2b7e-4b4e-9a0c-850faf5fe543"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
COLUMNS = (
    Column("device"),
    Column("owner"),
    Column("gateway", wide=True),
    Column("sync state"),
    Column("last change"),
)
ROWS = [
    [ID, "alice", "gw-1", "in_sync", "2026-12-03T14:55:49+00:00"],
    [OTHER, "bob", "", "out_of_sync", "2026-12-03T14:55:50+00:00"],
]


def plain(*, wide: bool = False) -> list[str]:
    out = io.StringIO()
    print_table("2 device(s)", COLUMNS, ROWS, wide=wide, stream=out, terminal=False)
    return out.getvalue().splitlines()


def rich_cells(text: str, n: int) -> list[str]:
    """Each column's text of a rich table's body rows, its folded lines joined."""
    cols = [""] * n
    for line in ANSI.sub("", text).splitlines():
        if line.startswith("│"):
            parts = line.split("│")[1:-1]
            assert len(parts) == n, line
            for i, part in enumerate(parts):
                cols[i] += part.strip()
    return cols


def test_off_a_terminal_every_identifier_is_whole_one_row_a_line() -> None:
    lines = plain()
    assert lines[0].split() == ["DEVICE", "OWNER", "SYNC_STATE", "LAST_CHANGE"]
    assert [line.split() for line in lines[1:]] == [
        [ID, "alice", "in_sync", "2026-12-03T14:55:49+00:00"],
        [OTHER, "bob", "out_of_sync", "2026-12-03T14:55:50+00:00"],
    ]
    (found,) = [line for line in lines if ID in line]  # what `twinhub devices | grep ID` does
    assert "…" not in "".join(lines)
    assert found.startswith(ID)


def test_off_a_terminal_wide_adds_its_columns_and_an_empty_cell_is_a_dash() -> None:
    lines = plain(wide=True)
    assert lines[0].split() == ["DEVICE", "OWNER", "GATEWAY", "SYNC_STATE", "LAST_CHANGE"]
    assert lines[1].split()[2] == "gw-1"
    assert lines[2].split()[2] == "-"  # awk '{print $3}' stays the gateway column
    # columns line up: each starts where its header does
    start = lines[0].index("GATEWAY")
    assert lines[1][start:].startswith("gw-1") and lines[2][start:].startswith("-")


@pytest.mark.parametrize("width", [20, 32, 40, 50, 60, 80, 120])
@pytest.mark.parametrize("wide", [False, True])
def test_on_a_terminal_a_narrow_table_folds_identifiers_never_cuts_them(
    width: int, wide: bool
) -> None:
    out = io.StringIO()
    print_table("2 device(s)", COLUMNS, ROWS, wide=wide, stream=out, terminal=True, width=width)
    text = out.getvalue()
    assert "…" not in text
    if "│" not in text:  # narrower than a character per column: plain columns, whole
        assert any(line.startswith(ID) for line in text.splitlines())
        return
    keep = [0, 1, 2, 3, 4] if wide else [0, 1, 3, 4]
    # each column's body text, its folded lines joined: its values whole, in row order
    assert rich_cells(text, len(keep)) == ["".join(row[i] for row in ROWS) for i in keep]


def test_on_a_wide_terminal_an_identifier_stays_on_one_line() -> None:
    out = io.StringIO()
    print_table("2 device(s)", COLUMNS, ROWS, stream=out, terminal=True, width=120)
    assert ID in ANSI.sub("", out.getvalue())


def parse(*argv: str) -> str:
    p = argparse.ArgumentParser()
    add_output_options(p)
    output: str = p.parse_args(argv).output
    return output


def test_output_options() -> None:
    assert parse() == "table"
    assert parse("--json") == parse("-o", "json") == parse("--output", "json") == "json"
    assert parse("-o", "wide") == "wide"
    with pytest.raises(SystemExit):
        parse("-o", "yaml")
