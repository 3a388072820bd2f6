"""The dependency rules of docs/architecture.md, checked on the import statements."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {
    "proto",
    "eventstore",
    "auth",
    "gateway",
    "twin",
    "twinhub_cli",
    "devicesim",
    "twinhub_client",
}

# package -> packages of ours it may import
ALLOWED = {
    "proto": {"proto"},
    "eventstore": {"proto", "eventstore"},
    # token validation, shared by the gateway, the command API and the NATS auth callout
    "auth": {"auth"},
    "gateway": {"proto", "eventstore", "auth", "gateway"},
    # the command API's validator is injected; twin takes its types and errors from auth
    "twin": {"proto", "eventstore", "auth", "twin"},
    "devicesim": {"proto", "devicesim", "twinhub_cli"},
    # the application-side client: the contracts, and the log's consumers for subscriptions
    "twinhub_client": {"proto", "eventstore", "twinhub_client"},
}
# third-party library -> the only places (path prefixes) that may import it
CONFINED = {
    # The twin's command API is NATS request/reply (not the event log): its transport adapter
    # speaks NATS itself. The client talks to that API and to JetStream.
    "nats": (
        "eventstore/adapters/",
        "twinhub_cli/",
        "twin/adapters/nats_api.py",
        "twinhub_client/",
    ),
    "aiocoap": ("gateway/adapters/", "devicesim/"),
    "pymongo": ("twin/adapters/", "twinhub_cli/"),
    "motor": (),
}


def imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def sources() -> list[Path]:
    return sorted(p for pkg in OURS for p in (ROOT / pkg).rglob("*.py"))


def violations(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        package = rel.split("/", 1)[0]
        for line, module in imports(path):
            top = module.split(".", 1)[0]
            if top in OURS and package in ALLOWED and top not in ALLOWED[package]:
                found.append(f"{rel}:{line} {package} must not import {module}")
            if top in CONFINED and not rel.startswith(CONFINED[top]):
                found.append(f"{rel}:{line} {top} is confined to {CONFINED[top]}")
    return found


def test_the_packages_keep_their_layers() -> None:
    assert sources(), "no sources found"
    assert violations(sources()) == []


@pytest.mark.parametrize(
    ("where", "code"),
    [
        ("gateway/x.py", "from twin.model import Twin\n"),
        ("twin/x.py", "import gateway.session\n"),
        ("proto/x.py", "from eventstore.ports import EventStore\n"),
        ("gateway/session.py", "import nats\n"),
        ("twin/fold.py", "from pymongo import AsyncMongoClient\n"),
        ("twin/api.py", "import nats\n"),
        ("twinhub_client/client.py", "from twin.model import Twin\n"),
        ("eventstore/ports.py", "import aiocoap\n"),
        ("auth/tokens.py", "from gateway.errors import GatewayError\n"),
        ("auth/jwks.py", "import proto.api\n"),
        ("proto/api.py", "from auth.tokens import Claims\n"),
        ("eventstore/ports.py", "import auth.errors\n"),
    ],
)
def test_the_checker_catches_a_violation(
    tmp_path: Path, where: str, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(code, encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert len(violations([target])) == 1
