"""How the listings (``twinhub devices``, ``twinhub pending``) print: ``-o table|wide|json``.

* ``table`` (the default) and ``wide`` (more columns). On a terminal a rich table whose cells
  wrap, folding a long value over lines, never cutting it: a device ID stays whole at any
  terminal width. Elsewhere (a pipe, a file) plain columns: a header line, then one line per
  row, every value whole and padded to its column's widest, so that ``grep``, ``awk`` and
  ``cut`` see complete identifiers (rich cut them to ``850faf5f-e543-…`` at 80 columns).
* ``json`` (also ``--json``): one JSON object a line, every field, for scripts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, TextIO

__all__ = ["Column", "add_output_options", "print_table"]

Output = Literal["table", "wide", "json"]
OUTPUTS: Final = ("table", "wide", "json")
EMPTY: Final = "-"  # a blank cell in plain columns: awk still counts one field
_MIN_CELL: Final = 4  # a rich column's width at the least: a border, 2 of padding, 1 character


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    wide: bool = False  # only with ``-o wide``


def add_output_options(p: argparse.ArgumentParser) -> None:
    """``-o/--output table|wide|json`` and ``--json`` (= ``-o json``) into ``args.output``."""
    p.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default="table",
        help="table (default), wide (more columns) or json (JSON lines)",
    )
    p.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        help="JSON lines instead of a table (= -o json)",
    )


def print_table(
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    wide: bool = False,
    stream: TextIO | None = None,
    terminal: bool | None = None,
    width: int | None = None,
) -> None:
    """``rows`` (a value per column, in ``columns``' order) on ``stream`` (stdout): a rich table
    on a terminal (``terminal`` None: ``stream.isatty()``; ``width``: the terminal's), plain
    columns otherwise. Without ``wide`` the wide columns are left out."""
    out = stream if stream is not None else sys.stdout
    shown = [i for i, c in enumerate(columns) if wide or not c.wide]
    headers = [columns[i].header for i in shown]
    cells = [[row[i] for i in shown] for row in rows]
    if terminal is None:
        terminal = out.isatty()
    if terminal:
        _rich(title, headers, cells, out, width)
    else:
        _plain(headers, cells, out)


def _rich(
    title: str, headers: list[str], cells: list[list[str]], out: TextIO, width: int | None
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        # fold: a value longer than its column continues on the next line (rich's default,
        # "ellipsis", drops its end)
        table.add_column(h, overflow="fold")
    for row in cells:
        table.add_row(*row)
    console = Console(file=out, width=width, force_terminal=True)
    if console.width < _MIN_CELL * len(headers) + 1:
        # too narrow for a character per column: rich would drop them, print them whole
        _plain(headers, cells, out)
        return
    console.print(table)


def _plain(headers: list[str], cells: list[list[str]], out: TextIO) -> None:
    header = [h.upper().replace(" ", "_") for h in headers]
    lines = [header, *([c.replace("\n", " ") or EMPTY for c in row] for row in cells)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        text = "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
        out.write(text + "\n")
    out.flush()
