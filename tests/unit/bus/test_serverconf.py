"""The nats-server configuration (bus.serverconf): accounts, users, callout, imports, TLS.

The rendered text is also handed to the real ``nats-server -t`` (configuration test, no
server started), so a configuration the server would refuse fails here."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.credentials import BusCredentials, ensure_credentials
from bus.permissions import (
    ACCOUNT_APPS,
    ACCOUNT_AUTH,
    ACCOUNT_SYS,
    ACCOUNT_TWINHUB,
    APP_JS_PREFIX,
    ROLES,
    Role,
    app_imports,
    application_permissions,
    service_permissions,
)
from bus.serverconf import (
    ROUTE_USER,
    ClusterRoutes,
    ServerTls,
    render_server_config,
    server_name_of,
)
from twinhub_cli import pki
from twinhub_cli.devservices import find_nats_server_binary

from .matching import covers

STREAM = "TWINHUB_EVENTS"
PROJECTOR = "twin-projector"


@pytest.fixture
def creds(tmp_path: Path) -> BusCredentials:
    return ensure_credentials(tmp_path / "bus")


def render(creds: BusCredentials, **kw: Any) -> dict[str, Any]:
    text = render_server_config(
        issuer=creds.issuer_public(),
        users=creds.users(),
        stream=STREAM,
        projector=PROJECTOR,
        **kw,
    )
    conf = json.loads(text)
    assert isinstance(conf, dict)
    return conf


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair anywhere in the parsed configuration."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def nats_server_accepts(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "nats.conf"
    path.write_text(text, encoding="utf-8")
    return subprocess.run(
        [str(find_nats_server_binary()), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def self_signed(tmp_path: Path) -> ServerTls:
    """A server certificate for localhost from a fresh development CA."""
    server = pki.issue_server(pki.create_ca(tmp_path / "pki"), tmp_path / "pki", ["localhost"])
    return ServerTls(server.cert_path, server.key_path)


def test_the_rendered_text_is_json_nats_server_accepts(
    creds: BusCredentials, tmp_path: Path
) -> None:
    text = render_server_config(
        issuer=creds.issuer_public(), users=creds.users(), stream=STREAM, projector=PROJECTOR
    )
    json.loads(text)
    done = nats_server_accepts(tmp_path, text)
    assert done.returncode == 0, done.stderr + done.stdout


def test_nats_server_accepts_it_with_tls_and_a_connection_limit(
    creds: BusCredentials, tmp_path: Path
) -> None:
    text = render_server_config(
        issuer=creds.issuer_public(),
        users=creds.users(),
        stream=STREAM,
        projector=PROJECTOR,
        tls=self_signed(tmp_path),
        max_connections=100,
    )
    done = nats_server_accepts(tmp_path, text)
    assert done.returncode == 0, done.stderr + done.stdout


def test_the_nats_server_check_can_fail(creds: BusCredentials, tmp_path: Path) -> None:
    """The check above means something: a broken issuer key is refused."""
    conf = render(creds)
    conf["authorization"]["auth_callout"]["issuer"] = "X" + creds.issuer_public()[1:]
    assert nats_server_accepts(tmp_path, json.dumps(conf)).returncode != 0


def test_no_anonymous_way_in(creds: BusCredentials) -> None:
    conf = render(creds)
    keys = {k for k, _ in walk(conf)}
    assert not keys & {"no_auth_user", "password", "token", "user", "allow_non_tls"}
    assert "no_auth_user" not in conf
    for account in conf["accounts"].values():
        for user in account.get("users", []):
            assert set(user) <= {"nkey", "permissions"}, user
            assert user["nkey"].startswith("U")
    assert "users" not in conf["accounts"][ACCOUNT_APPS]  # only the callout places users there


def test_every_role_has_its_nkey_in_its_account(creds: BusCredentials) -> None:
    conf = render(creds)
    keys = creds.users()
    accounts = conf["accounts"]
    twinhub = [u["nkey"] for u in accounts[ACCOUNT_TWINHUB]["users"]]
    assert sorted(twinhub) == sorted([keys["gateway"], keys["twin"], keys["admin"]])
    assert [u["nkey"] for u in accounts[ACCOUNT_AUTH]["users"]] == [keys["callout"]]
    assert len(set(keys.values())) == len(ROLES)


def rules(allow: tuple[str, ...], deny: tuple[str, ...]) -> dict[str, list[str]]:
    out = {"allow": list(allow)} if allow else {}
    if deny:
        out["deny"] = list(deny)
    return out or {"deny": [">"]}  # nothing allowed: everything denied, never "no list"


def test_each_user_gets_its_roles_permissions(creds: BusCredentials) -> None:
    conf = render(creds)
    by_key = {u["nkey"]: u for acc in conf["accounts"].values() for u in acc.get("users", [])}
    for role, key in creds.users().items():
        entry = by_key[key]
        want = service_permissions(role, STREAM, PROJECTOR)
        if want.unrestricted:
            assert "permissions" not in entry
            continue
        perms = entry["permissions"]
        assert perms["publish"] == rules(want.pub_allow, want.pub_deny)
        assert perms["subscribe"] == rules(want.sub_allow, want.sub_deny)
        assert ("allow_responses" in perms) == want.responses


def test_a_responder_without_publish_rights_publishes_nothing(creds: BusCredentials) -> None:
    conf = render(creds)
    (callout,) = conf["accounts"][ACCOUNT_AUTH]["users"]
    perms = callout["permissions"]
    # an empty allow list would mean "everything": it must be an explicit deny of all
    assert perms["publish"] == {"deny": [">"]}
    assert perms["subscribe"] == {"allow": ["$SYS.REQ.USER.AUTH"]}
    assert perms["allow_responses"]["max"] == 1


def test_the_auth_callout(creds: BusCredentials) -> None:
    conf = render(creds)
    callout = conf["authorization"]["auth_callout"]
    assert callout["issuer"] == creds.issuer_public()
    assert callout["issuer"].startswith("A")
    assert callout["account"] == ACCOUNT_AUTH
    assert sorted(callout["auth_users"]) == sorted(creds.users().values())
    assert "xkey" not in callout  # requests are plain: bus.callout decodes them so
    assert conf["authorization"]["timeout"] == 5.0
    assert conf["system_account"] == ACCOUNT_SYS
    assert ACCOUNT_SYS in conf["accounts"]


def test_only_twinhub_has_jetstream(creds: BusCredentials) -> None:
    accounts = render(creds)["accounts"]
    assert accounts[ACCOUNT_TWINHUB]["jetstream"] == "enabled"
    for name in (ACCOUNT_APPS, ACCOUNT_AUTH, ACCOUNT_SYS):
        assert "jetstream" not in accounts[name]


def test_tls_only_when_given(creds: BusCredentials, tmp_path: Path) -> None:
    assert "tls" not in render(creds)
    tls = ServerTls(tmp_path / "c.pem", tmp_path / "k.pem")
    block = render(creds, tls=tls)["tls"]
    assert block["cert_file"] == str(tls.cert_file)
    assert block["key_file"] == str(tls.key_file)
    assert "max_connections" not in render(creds)
    assert render(creds, max_connections=7)["max_connections"] == 7


def test_every_apps_import_has_its_twinhub_export(creds: BusCredentials) -> None:
    accounts = render(creds)["accounts"]
    exports = accounts[ACCOUNT_TWINHUB]["exports"]
    imports = accounts[ACCOUNT_APPS]["imports"]
    assert imports
    exported = set()
    for export in exports:
        (kind,) = {"service", "stream"} & set(export)
        assert export["accounts"] == [ACCOUNT_APPS]
        exported.add((kind, export[kind]))
    imported = set()
    for imp in imports:
        (kind,) = {"service", "stream"} & set(imp)
        assert imp[kind]["account"] == ACCOUNT_TWINHUB
        imported.add((kind, imp[kind]["subject"]))
    assert imported == exported  # each import matches an export of its kind, and no extra
    assert len(imported) == len(imports) == len(exports)


def test_pull_requests_are_exported_as_streamed_responses(creds: BusCredentials) -> None:
    exports = render(creds)["accounts"][ACCOUNT_TWINHUB]["exports"]
    for export in exports:
        subject = export.get("service", "")
        streamed = ".MSG.NEXT." in subject
        assert (export.get("response_type") == "stream") == streamed, export
    assert any(".MSG.NEXT." in e.get("service", "") for e in exports)


def test_imports_map_the_app_prefix_onto_twinhubs_jetstream_api(creds: BusCredentials) -> None:
    imports = render(creds)["accounts"][ACCOUNT_APPS]["imports"]
    for imp in imports:
        (kind,) = {"service", "stream"} & set(imp)
        subject = imp[kind]["subject"]
        if subject.startswith("$JS.API."):
            assert imp["to"] == APP_JS_PREFIX + subject.removeprefix("$JS.API")
        else:
            assert "to" not in imp
    assert not any(i.get("stream", {}).get("subject", "").startswith("$JS") for i in imports)


def test_what_an_app_may_publish_it_can_reach_through_an_import(creds: BusCredentials) -> None:
    """The callout's application permissions and the imports agree: every allowed publish
    lands on an APPS service import, nothing allowed is left dangling."""
    imports = render(creds)["accounts"][ACCOUNT_APPS]["imports"]
    local = [i.get("to", i["service"]["subject"]) for i in imports if "service" in i]
    perms = application_permissions("alice", STREAM, [PROJECTOR])
    for pattern in perms.pub_allow:
        assert any(covers(imp, pattern) for imp in local), pattern
    streams = [i["stream"]["subject"] for i in imports if "stream" in i]
    events = [s for s in perms.sub_allow if s.startswith("twinhub.ev.")]
    assert events
    for pattern in events:
        assert any(covers(s, pattern) for s in streams), pattern


def test_imports_follow_the_stream_name(creds: BusCredentials) -> None:
    conf = json.loads(
        render_server_config(
            issuer=creds.issuer_public(), users=creds.users(), stream="OTHER", projector="p"
        )
    )
    subjects = [
        i.get("service", i.get("stream"))["subject"] for i in conf["accounts"]["APPS"]["imports"]
    ]
    assert any(".OTHER." in s or s.endswith(".OTHER.>") for s in subjects)
    assert not any(STREAM in s for s in subjects)
    assert len(subjects) == len(app_imports("OTHER"))


@pytest.mark.parametrize("missing", ROLES)
def test_refuses_a_missing_role_key(creds: BusCredentials, missing: Role) -> None:
    users = {r: k for r, k in creds.users().items() if r != missing}
    with pytest.raises(ValueError, match=missing):
        render_server_config(
            issuer=creds.issuer_public(), users=users, stream=STREAM, projector=PROJECTOR
        )


def _routes(**kw: Any) -> ClusterRoutes:
    base: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": 6222,
        "routes": (("127.0.0.1", 6222), ("127.0.0.2", 6222), ("127.0.0.3", 6222)),
        "password": "a-route-password-of-some-length",
    }
    return ClusterRoutes(**{**base, **kw})


def test_nats_server_accepts_a_cluster_member_with_tls_routes(
    creds: BusCredentials, tmp_path: Path
) -> None:
    tls = self_signed(tmp_path)
    text = render_server_config(
        issuer=creds.issuer_public(),
        users=creds.users(),
        stream=STREAM,
        projector=PROJECTOR,
        tls=tls,
        cluster=_routes(ca_file=tmp_path / "pki" / "ca.crt"),
        server_name="twinhub-2",
    )
    done = nats_server_accepts(tmp_path, text)
    assert done.returncode == 0, done.stderr + done.stdout
    conf = json.loads(text)
    assert conf["server_name"] == "twinhub-2"
    assert conf["cluster"]["tls"]["ca_file"] == str(tmp_path / "pki" / "ca.crt")


def test_routes_are_admitted_with_the_route_password_only(creds: BusCredentials) -> None:
    conf = render(creds, cluster=_routes())
    cluster = conf.pop("cluster")
    assert cluster["name"] == "twinhub"
    assert (cluster["host"], cluster["port"]) == ("127.0.0.1", 6222)
    auth = cluster["authorization"]
    assert auth["user"] == ROUTE_USER and auth["password"] == "a-route-password-of-some-length"
    assert cluster["routes"] == [
        f"nats-route://{ROUTE_USER}:a-route-password-of-some-length@127.0.0.{i}:6222"
        for i in (1, 2, 3)
    ]
    assert cluster["no_advertise"] is True
    # the clients' side is what it is on one server: no password, no anonymous user
    assert conf == render(creds)


def test_a_cluster_refuses_weak_or_incomplete_settings(
    creds: BusCredentials, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="16 characters"):
        _routes(password="short")
    with pytest.raises(ValueError, match="routes"):
        _routes(routes=())
    tls = ServerTls(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises(ValueError, match="ca_file"):
        render(creds, tls=tls, cluster=_routes())
    assert server_name_of(None) == "twinhub"
    assert server_name_of(3) == "twinhub-3"
