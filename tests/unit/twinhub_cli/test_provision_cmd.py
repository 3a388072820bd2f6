"""``twinhub provision``'s command line: the bare form and the revoke / rotate actions parse
with the options anywhere; misuse is refused before anything is sent."""

from __future__ import annotations

import pytest

from twinhub_cli.main import build_parser, main
from twinhub_cli.provision_cmd import _problem


@pytest.mark.parametrize(
    ("argv", "action", "target", "device"),
    [
        (["provision", "--owner", "o"], None, None, None),
        (
            ["provision", "--owner", "o", "--device", "d1", "--name", "n", "--json"],
            None,
            None,
            "d1",
        ),
        (["provision", "revoke", "d1", "--owner", "o"], "revoke", "d1", None),
        (["provision", "--owner", "o", "rotate", "d1", "--json"], "rotate", "d1", None),
    ],
)
def test_forms(argv: list[str], action: str | None, target: str | None, device: str | None) -> None:
    args = build_parser().parse_args(argv)
    assert (args.action, args.target, args.device, args.owner) == (action, target, device, "o")
    assert _problem(args) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["provision", "revoke", "--owner", "o"], "needs the DEVICE"),
        (["provision", "rotate", "d1", "--device", "d2", "--owner", "o"], "--device and --name"),
    ],
)
def test_misuse_is_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_action_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["provision", "delete", "d1"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
