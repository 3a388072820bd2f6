"""The composition of token validation from the configuration (twinhub_cli.services)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from auth.errors import TokenError
from twinhub_cli import config as cfgmod
from twinhub_cli import services
from twinhub_cli.datadir import DataDir

DEVICE_CLAIM = "https://example.com/deviceId"


def test_with_a_device_claim_devices_need_it_and_applications_must_not_have_it(
    tmp_path: Path,
) -> None:
    config = cfgmod.load(None, env={}, overrides={"auth": {"device_claim": DEVICE_CLAIM}})
    issuer = services.issuer_for(config, DataDir(tmp_path))
    now = time.time()
    app_token = issuer.issue("alice", now=now, ttl=3600)
    device_token = issuer.issue("alice", now=now, ttl=3600, device_id="d1")
    devices = services.validator_for(config, issuer)
    apps = services.app_validator_for(config, issuer)
    assert apps.validate(app_token, now).owner == "alice"
    with pytest.raises(TokenError, match="a device token is not an application token"):
        apps.validate(device_token, now)
    assert devices.validate(device_token, now).device_id == "d1"
    with pytest.raises(TokenError, match="no device claim"):
        devices.validate(app_token, now)


def test_the_maximum_lifetime_is_configured(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    default = cfgmod.load(None, env={})
    assert default.auth.app_token_max_lifetime == 7 * 24 * 3600
    issuer = services.issuer_for(default, data)
    assert services.app_validator_for(default, issuer).max_lifetime == 7 * 24 * 3600
    hour = cfgmod.load(None, env={"TWINHUB_AUTH_APP_TOKEN_MAX_LIFETIME": "3600"})
    now = time.time()
    day_token = issuer.issue("alice", now=now, ttl=24 * 3600)
    with pytest.raises(TokenError, match="exceeds the maximum of 3600 s"):
        services.app_validator_for(hour, issuer).validate(day_token, now)
    unbounded = cfgmod.load(None, env={}, overrides={"auth": {"app_token_max_lifetime": 0}})
    assert services.app_validator_for(unbounded, issuer).max_lifetime is None


def test_the_cli_tokens_for_applications_are_application_tokens(tmp_path: Path) -> None:
    config = cfgmod.load(None, env={})
    data = DataDir(tmp_path)
    apps = services.app_validator_for(config, services.issuer_for(config, data))
    assert apps.validate(services.first_device_token(config, data, "alice"), time.time())


@pytest.mark.parametrize(
    "uri", ["coaps+tcp://gw2.example:5684", "coap+tcp://127.0.0.1:5683", "coap+tcp://[::1]:1/"]
)
def test_a_drain_alternative_is_a_coap_tcp_uri_with_host_and_port(uri: str) -> None:
    assert services.drain_alternative(uri) == uri
    assert services.drain_alternative("") is None


@pytest.mark.parametrize(
    "uri",
    [
        "gw2.example:5684",
        "coap://gw2.example:5683",
        "coaps+tcp://gw2.example",
        "coaps+tcp://:5684",
        "coaps+tcp://gw2.example:5684/x",
        "coaps+tcp://gw2.example:99999",
    ],
)
def test_a_drain_alternative_that_is_not_one_is_a_config_error(uri: str) -> None:
    with pytest.raises(services.ConfigError, match=r"gateway\.drain_alternative"):
        services.drain_alternative(uri)


def test_the_gateway_drains_by_default(tmp_path: Path) -> None:
    config = cfgmod.load(None, env={"TWINHUB_GATEWAY_DRAIN_ALTERNATIVE": "coap+tcp://h:1"})
    gw = services.gateway_config(config, DataDir(tmp_path))
    assert (gw.drain_timeout, gw.drain_alternative, gw.drain_hold_off) == (
        10.0,
        "coap+tcp://h:1",
        None,
    )
