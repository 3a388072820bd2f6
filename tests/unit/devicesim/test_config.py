from __future__ import annotations

from pathlib import Path

import pytest

from devicesim.config import (
    BatchSupport,
    DeviceConfig,
    TlsOptions,
    device_id_for,
    parse_gateway_uri,
)
from devicesim.errors import SimConfigError


@pytest.mark.parametrize(
    ("uri", "tls", "expected"),
    [
        ("coap+tcp://gw.example", False, ("coap+tcp", "gw.example", 5683)),
        ("coaps+tcp://gw.example", False, ("coaps+tcp", "gw.example", 5684)),
        ("coap+tcp://127.0.0.1:9000", False, ("coap+tcp", "127.0.0.1", 9000)),
        ("coap+tcp://gw.example", True, ("coaps+tcp", "gw.example", 5684)),
        ("coap+tcp://gw.example:7000/", True, ("coaps+tcp", "gw.example", 7000)),
        ("COAPS+TCP://[::1]:5684", False, ("coaps+tcp", "::1", 5684)),
    ],
)
def test_parse_gateway_uri(uri: str, tls: bool, expected: tuple[str, str, int]) -> None:
    gw = parse_gateway_uri(uri, tls=tls)
    assert (gw.scheme, gw.host, gw.port) == expected
    assert gw.tls == (expected[0] == "coaps+tcp")


def test_gateway_uri_round_trips_ipv6() -> None:
    assert parse_gateway_uri("coap+tcp://[::1]:1").uri == "coap+tcp://[::1]:1"


@pytest.mark.parametrize(
    "uri",
    ["coap://gw", "http://gw", "coap+tcp://", "coap+tcp://gw/oic/res", "coap+tcp://gw:99999"],
)
def test_parse_gateway_uri_rejects(uri: str) -> None:
    with pytest.raises(SimConfigError):
        parse_gateway_uri(uri)


def test_batch_support_from_bool_and_text() -> None:
    assert BatchSupport.of(True) is BatchSupport.OBSERVE
    assert BatchSupport.of(False) is BatchSupport.GET_ONLY
    assert BatchSupport.of("reject") is BatchSupport.REJECT


def test_device_ids_are_stable_uuids() -> None:
    a = device_id_for("sim", 0)
    assert a == device_id_for("sim", 0)
    assert a != device_id_for("sim", 1)
    assert a != device_id_for("other", 0)
    assert len(a) == 36


def test_device_config_validates() -> None:
    gw = parse_gateway_uri("coap+tcp://gw")
    DeviceConfig(gateway=gw, device_id="d", token="t")
    for bad in (
        {"resources": -1},
        {"rate": -1.0},
        {"content_format": 0},
        {"ping_interval": 0.0},
        {"refresh_fraction": 1.0},
        {"request_timeout": 0.0},
        {"token": ""},
    ):
        with pytest.raises(SimConfigError):
            DeviceConfig(**{"gateway": gw, "device_id": "d", "token": "t", **bad})


def test_tls_options_need_cert_and_key_together() -> None:
    with pytest.raises(SimConfigError):
        TlsOptions(cert_file=None, key_file=Path("k"))


def test_tls_options_report_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match="cannot load TLS files"):
        TlsOptions(ca_file=tmp_path / "missing.pem").ssl_context()


def test_tls_options_context_speaks_coap_alpn() -> None:
    ctx = TlsOptions(verify=False).ssl_context()
    assert not ctx.check_hostname
