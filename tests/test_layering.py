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
    "bus",
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
    # who may do what on NATS, the server configuration, the auth callout (which validates
    # application tokens with auth and speaks to the server through an eventstore endpoint)
    "bus": {"proto", "eventstore", "auth", "bus"},
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
    # speaks NATS itself. The client talks to that API and to JetStream. The auth callout's
    # adapter answers the server's authorization requests.
    "nats": (
        "eventstore/adapters/",
        "twinhub_cli/",
        "twin/adapters/nats_api.py",
        "twinhub_client/",
        "bus/adapters/",
    ),
    # NKeys: the callout's adapter signs with the issuer's; bus/credentials.py makes the seeds.
    # The sans-IO callout core signs through its Signer protocol, without importing nkeys.
    "nkeys": ("bus/adapters/", "bus/credentials.py"),
    # the UDP / DTLS profile of simple devices; the peer of the tests and of devicesim. The
    # OCF path over TCP runs on our own RFC 8323 connection (gateway/wire/).
    "aiocoap": ("gateway/adapters/coap_udp.py", "devicesim/"),
    "OpenSSL": ("gateway/adapters/dtls.py",),  # pyOpenSSL: the DTLS terminator
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
        ("bus/permissions.py", "from twin.model import Twin\n"),
        ("bus/callout.py", "import gateway.session\n"),
        ("bus/callout.py", "import nats\n"),
        ("bus/callout.py", "import nkeys\n"),
        ("bus/serverconf.py", "from twinhub_cli.devservices import NatsServer\n"),
        ("auth/application.py", "from bus.permissions import Role\n"),
        ("eventstore/adapters/endpoint.py", "import bus.permissions\n"),
        ("eventstore/adapters/jetstream.py", "import nkeys\n"),
        ("gateway/session.py", "from bus.callout import grant\n"),
        ("twin/api.py", "import bus.permissions\n"),
        ("twinhub_client/client.py", "from bus.permissions import inbox_prefix\n"),
        ("twinhub_client/client.py", "import gateway.errors\n"),
        ("twinhub_client/client.py", "import nkeys\n"),
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


@pytest.mark.parametrize(
    ("where", "code"),
    [
        ("bus/callout.py", "from auth.application import AppTokenValidator\n"),
        ("bus/permissions.py", "from proto import api, subjects\n"),
        (
            "bus/adapters/nats_callout.py",
            "import nats\nimport nkeys\nfrom eventstore.adapters.endpoint import NatsEndpoint\n",
        ),
        ("bus/credentials.py", "import nkeys\n"),
        ("twinhub_cli/services.py", "from bus.adapters.nats_callout import CalloutService\n"),
        ("twinhub_client/client.py", "import nats\nfrom eventstore.layout import DEFAULT_STREAM\n"),
    ],
)
def test_the_checker_admits_what_the_layers_allow(
    tmp_path: Path, where: str, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(code, encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert violations([target]) == []


# --------------------------------------------------------------------------- aiocoap's privates

PRIVATE_FREE = ("gateway/",)
"""Where no private name of aiocoap may be used (issue 13): the gateway runs on our own RFC 8323
connection, and its UDP profile on aiocoap's public API, so that the aiocoap pin can be a range."""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def aiocoap_private_names(path: Path) -> list[str]:
    """Private aiocoap names ``path`` uses: imported (``from aiocoap.x import _y``, a private
    module), reached through an aiocoap name (``aiocoap.x._y``), or, in a class deriving from an
    aiocoap class, a private method overridden or a private attribute read that the class does
    not define itself (``self._pool``, ``super()._send_message``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    rel = path.relative_to(ROOT).as_posix()
    bound: set[str] = set()  # local names bound to aiocoap modules or objects
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "aiocoap":
                    bound.add((alias.asname or alias.name).split(".")[0])
                    if any(_is_private(part) for part in alias.name.split(".")):
                        found.append(f"{rel}:{node.lineno} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "aiocoap":
                continue
            if any(_is_private(part) for part in node.module.split(".")):
                found.append(f"{rel}:{node.lineno} imports {node.module}")
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if _is_private(alias.name):
                    found.append(f"{rel}:{node.lineno} imports {node.module}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = _root(node)
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{rel}:{node.lineno} uses {ast.unparse(node)}")
        if isinstance(node, ast.ClassDef):
            derived = any(
                isinstance(r := _root(base), ast.Name) and r.id in bound for base in node.bases
            )
            if derived:
                found += _private_uses_in_subclass(rel, node)
    return found


def _private_uses_in_subclass(rel: str, cls: ast.ClassDef) -> list[str]:
    own: set[str] = set()
    for item in ast.walk(cls):
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            own.add(item.name)
        elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store):
            own.add(item.attr)
    found = []
    for item in ast.walk(cls):
        if isinstance(item, ast.Attribute) and _is_private(item.attr):
            base = item.value
            is_self = isinstance(base, ast.Name) and base.id == "self"
            is_super = isinstance(base, ast.Call) and ast.unparse(base.func) == "super"
            if is_super or (is_self and item.attr not in own):
                found.append(f"{rel}:{item.lineno} uses the inherited {ast.unparse(item)}")
    return found


def test_the_gateway_uses_no_private_aiocoap_name() -> None:
    files = [p for p in sources() if p.relative_to(ROOT).as_posix().startswith(PRIVATE_FREE)]
    assert files
    assert [v for p in files for v in aiocoap_private_names(p)] == []


@pytest.mark.parametrize(
    "code",
    [
        "from aiocoap.transports.tcp import _serialize\n",
        "import aiocoap.transports._x\n",
        "import aiocoap\nctx = aiocoap.Context._dispatch_incoming\n",
        "from aiocoap.protocol import Context\nclass C(Context):\n"
        "    def f(self):\n        return self._tokenmanager\n",
        "from aiocoap import protocol\nclass C(protocol.Context):\n"
        "    def f(self):\n        return super()._render_to_pipe(1)\n",
    ],
)
def test_the_private_name_checker_catches(
    tmp_path: Path, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "gateway" / "x.py"
    target.parent.mkdir(parents=True)
    target.write_text(code, encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert len(aiocoap_private_names(target)) == 1


def test_the_private_name_checker_admits_our_own_private_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "gateway" / "x.py"
    target.parent.mkdir(parents=True)
    target.write_text(
        "from aiocoap import resource\nclass R(resource.Resource):\n"
        "    def __init__(self):\n        super().__init__()\n        self._mine = 1\n"
        "    def f(self):\n        return self._mine\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert aiocoap_private_names(target) == []
