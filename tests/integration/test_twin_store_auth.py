"""``services.twin_store`` signs in as ``mongo.username`` when it is set (the compose
deployment's MongoDB has authentication), against the real MongoDB-wire server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from tests.conftest import HasUrl
from twin.errors import TwinStoreError
from twinhub_cli import config as cfgmod
from twinhub_cli import services

pytestmark = pytest.mark.servers

AUTHENTICATION_FAILED = 18


class Recording(AsyncMongoClient[dict[str, Any]]):
    seen: dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Recording.seen = dict(kwargs)
        super().__init__(*args, **kwargs)


async def test_twin_store_signs_in_as_the_configured_user(
    mongo_server: HasUrl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = tmp_path / "mongo-twin-password"
    password.write_text("not-the-password\n")
    password.chmod(0o600)
    config = cfgmod.load(
        env={
            "TWINHUB_MONGO_URL": mongo_server.url,
            "TWINHUB_MONGO_DATABASE": "twinhub_auth_test",
            "TWINHUB_MONGO_USERNAME": "twinhub",
            "TWINHUB_MONGO_PASSWORD_FILE": str(password),
        }
    )
    monkeypatch.setattr(services, "AsyncMongoClient", Recording)
    # no such user with that password on the test server: the sign-in itself is refused
    with pytest.raises(TwinStoreError) as refused:
        async with services.twin_store(config):
            pass
    cause = refused.value.__cause__
    assert isinstance(cause, OperationFailure)
    assert cause.code == AUTHENTICATION_FAILED
    assert Recording.seen["username"] == "twinhub"
    assert Recording.seen["password"] == "not-the-password"
    assert Recording.seen["authSource"] == "twinhub_auth_test"  # the database's own user

    other = cfgmod.load(
        env={
            "TWINHUB_MONGO_URL": mongo_server.url,
            "TWINHUB_MONGO_USERNAME": "twinhub",
            "TWINHUB_MONGO_PASSWORD_FILE": str(password),
            "TWINHUB_MONGO_AUTH_SOURCE": "admin",
        }
    )
    with pytest.raises(TwinStoreError):
        async with services.twin_store(other):
            pass
    assert Recording.seen["authSource"] == "admin"


async def test_without_a_user_twin_store_connects_without_credentials(
    mongo_server: HasUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = cfgmod.load(
        env={"TWINHUB_MONGO_URL": mongo_server.url, "TWINHUB_MONGO_DATABASE": "twinhub_auth_test"}
    )
    monkeypatch.setattr(services, "AsyncMongoClient", Recording)
    async with services.twin_store(config) as twins:
        assert await twins.get("no-such-device") is None
    assert not {"username", "password", "authSource"} & set(Recording.seen)
