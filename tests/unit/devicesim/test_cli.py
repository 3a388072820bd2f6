from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from devicesim.cli import add_sim_parser, fleet_kwargs, run_sim
from devicesim.config import BatchSupport
from devicesim.errors import SimConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="twinhub")
    add_sim_parser(parser.add_subparsers())
    return parser.parse_args(["sim", *argv])


def test_defaults() -> None:
    args = parse("--gateway", "coap+tcp://127.0.0.1:5683", "--token", "T")
    assert args.handler is run_sim
    kw = fleet_kwargs(args)
    assert kw["uri"] == "coap+tcp://127.0.0.1:5683"
    assert (kw["devices"], kw["resources"], kw["rate"]) == (1, 1, 0.0)
    assert kw["tls"] is None
    assert kw["batch"] is BatchSupport.OBSERVE
    assert kw["reference_stack"] is False
    assert kw["token"] == "T"
    assert kw["ping_interval"] == 20.0
    assert kw["progress"] is True


def test_all_options() -> None:
    args = parse(
        "--gateway", "coap+tcp://gw", "--devices", "100", "--resources", "5", "--rate", "2.5",
        "--tls", "--ca", "ca.pem", "--cert", "c.pem", "--key", "k.pem", "--duration", "30",
        "--token", "T", "--reference-stack", "--no-batch", "--device-prefix", "bench",
        "--connect-concurrency", "8", "--ping-interval", "0", "--no-progress",
    )  # fmt: skip
    kw = fleet_kwargs(args)
    assert (kw["devices"], kw["resources"], kw["rate"], kw["duration"]) == (100, 5, 2.5, 30.0)
    assert kw["force_tls"] is True
    assert kw["tls"].ca_file == Path("ca.pem")
    assert kw["tls"].cert_file == Path("c.pem")
    assert kw["tls"].key_file == Path("k.pem")
    assert kw["reference_stack"] is True
    assert kw["batch"] is BatchSupport.GET_ONLY
    assert kw["device_prefix"] == "bench"
    assert kw["connect_concurrency"] == 8
    assert kw["ping_interval"] is None
    assert kw["progress"] is False


def test_batch_mode_wins_over_no_batch() -> None:
    args = parse("--gateway", "coap+tcp://gw", "--token", "T", "--batch-mode", "reject")
    assert fleet_kwargs(args)["batch"] is BatchSupport.REJECT


def test_coaps_uri_implies_tls_options() -> None:
    args = parse("--gateway", "coaps+tcp://gw", "--token", "T")
    tls = fleet_kwargs(args)["tls"]
    assert tls is not None
    assert tls.verify


@pytest.mark.parametrize(
    "argv",
    [
        ("--gateway", "coap+tcp://gw"),
        ("--gateway", "coap+tcp://gw", "--owner", "alice"),
        ("--gateway", "coap+tcp://gw", "--token", "T", "--duration", "0"),
    ],
)
def test_config_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(SimConfigError):
        fleet_kwargs(parse(*argv))


def test_handler_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_sim(parse("--gateway", "coap+tcp://gw")) == 2
    assert "give --token" in capsys.readouterr().err


def test_data_dir_mints_a_token_per_sign_up(tmp_path: Path) -> None:
    import jwt

    kw = fleet_kwargs(
        parse("--gateway", "coap+tcp://gw", "--data-dir", str(tmp_path), "--owner", "alice")
    )
    factory = kw["token"]
    claims = jwt.decode(factory("d1", None), options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert (tmp_path / "keys" / "jwt-signing-key.pem").exists()


def test_bad_numbers_are_usage_errors() -> None:
    with pytest.raises(SystemExit):
        parse("--gateway", "coap+tcp://gw", "--devices", "0")
