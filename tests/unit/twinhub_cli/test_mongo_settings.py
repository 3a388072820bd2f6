"""The twin service's MongoDB user (``mongo.username``, ``mongo.password_file``,
``mongo.auth_source``): the password comes from a private file, read when connecting."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinhub_cli import config as cfgmod
from twinhub_cli.config import ConfigError, MongoSettings


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_settings_exist_for_the_environment() -> None:
    names = cfgmod.env_names()
    for key in ("USERNAME", "PASSWORD_FILE", "AUTH_SOURCE"):
        assert f"TWINHUB_MONGO_{key}" in names


def test_the_password_is_read_from_the_file_when_asked(tmp_path: Path) -> None:
    path = secret(tmp_path / "pw", "s3cret\n")
    config = cfgmod.load(
        env={"TWINHUB_MONGO_USERNAME": "twinhub", "TWINHUB_MONGO_PASSWORD_FILE": str(path)}
    )
    assert "s3cret" not in repr(config)
    assert config.mongo.password() == "s3cret"
    path.write_text("changed")  # read again on each connection
    assert config.mongo.password() == "changed"


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("pw", 0o644, "is readable by others: chmod 600 it"),
        ("pw", 0o640, "is readable by others"),
        ("\n", 0o600, "is empty"),
    ],
)
def test_a_password_file_that_will_not_do(
    tmp_path: Path, text: str, mode: int, message: str
) -> None:
    path = secret(tmp_path / "pw", text, mode)
    settings = MongoSettings(username="twinhub", password_file=str(path))
    with pytest.raises(ConfigError, match=message):
        settings.password()


def test_no_file(tmp_path: Path) -> None:
    settings = MongoSettings(username="twinhub", password_file=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="no such file"):
        settings.password()
    with pytest.raises(ConfigError, match=r"mongo\.password_file is not set"):
        MongoSettings(username="twinhub").password()


def test_a_password_file_needs_a_user(tmp_path: Path) -> None:
    path = secret(tmp_path / "pw", "pw")
    with pytest.raises(ConfigError, match=r"mongo\.username is not"):
        cfgmod.load(env={"TWINHUB_MONGO_PASSWORD_FILE": str(path)})
