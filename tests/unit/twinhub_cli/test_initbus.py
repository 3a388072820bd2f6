"""``twinhub init --bus-export``: each process's own secrets, the NATS server's configuration
and certificate, MongoDB's passwords and initdb script (twinhub_cli.initbus)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from bus.credentials import BusCredentials
from twinhub_cli import initbus
from twinhub_cli.devservices import find_nats_server_binary
from twinhub_cli.main import build_parser

ROLE_FILES = {
    "gateway": ["gateway.nk"],
    "twin": ["consumer-key", "mongo-twin-password", "twin.nk"],
    "callout": ["callout.nk", "issuer.nk"],
    "admin": ["admin.nk"],
}


def init(tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    """``twinhub init`` into ``tmp_path`` (data, bus, export); exit code, stdout, stderr."""
    argv = [
        "init",
        "--data-dir",
        str(tmp_path / "data"),
        "--bus-dir",
        str(tmp_path / "bus"),
        *extra,
    ]
    args: argparse.Namespace = build_parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc: int = args.handler(args)
    return rc, out.getvalue(), err.getvalue()


def export(tmp_path: Path, *extra: str) -> Path:
    rc, _, err = init(tmp_path, "--bus-export", str(tmp_path / "export"), *extra)
    assert rc == 0, err
    return tmp_path / "export"


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_each_process_gets_exactly_its_own_files_private(tmp_path: Path) -> None:
    out = export(tmp_path)
    bus = BusCredentials(tmp_path / "bus")
    for role, names in ROLE_FILES.items():
        d = out / role
        assert sorted(p.name for p in d.iterdir()) == names
        assert mode(d) == 0o700
        for name in names:
            assert mode(d / name) == 0o600
            assert (d / name).stat().st_uid == os.geteuid()
            assert (d / name).read_bytes() == (tmp_path / "bus" / name).read_bytes()
    assert (out / "gateway" / "gateway.nk").read_bytes() == bus.seed_file("gateway").read_bytes()
    # the full set stays in the bus directory, the passwords with it
    assert {p.name for p in (tmp_path / "bus").iterdir()} >= {
        "mongo-root-password",
        "mongo-twin-password",
        "issuer.nk",
    }
    assert {mode(p) for p in (tmp_path / "bus").iterdir()} == {0o600}
    # mongo's: read by the mongo container through the group
    assert sorted(p.name for p in (out / "mongo").iterdir()) == [
        "mongo-keyfile",
        "mongo-root-password",
        "mongo-twin-password",
    ]
    assert [p.name for p in (out / "mongo-initdb").iterdir()] == ["twinhub-users.js"]
    for d in ("mongo", "mongo-initdb"):
        assert mode(out / d) == 0o750
        assert {mode(p) for p in (out / d).iterdir()} == {0o640}


def test_without_nats_hosts_the_conf_has_no_tls(tmp_path: Path) -> None:
    out = export(tmp_path)
    assert sorted(p.name for p in (out / "nats").iterdir()) == ["nats.conf"]
    conf = json.loads((out / "nats" / "nats.conf").read_text())
    assert "tls" not in conf
    users = BusCredentials(tmp_path / "bus").users()
    granted = conf["accounts"]["TWINHUB"]["users"] + conf["accounts"]["AUTH"]["users"]
    assert sorted(u["nkey"] for u in granted) == sorted(users.values())


def test_nats_tls_with_a_certificate_of_the_data_dirs_ca_for_the_names(tmp_path: Path) -> None:
    out = export(
        tmp_path, "--nats-host", "nats", "--nats-host", "127.0.0.1", "--nats-conf-dir", "/etc/x"
    )
    nats_dir = out / "nats"
    assert sorted(p.name for p in nats_dir.iterdir()) == ["nats.conf", "nats.crt", "nats.key"]
    assert {mode(p) for p in nats_dir.iterdir()} == {0o600}
    conf = json.loads((nats_dir / "nats.conf").read_text())
    assert conf["tls"]["cert_file"] == "/etc/x/nats.crt"
    assert conf["tls"]["key_file"] == "/etc/x/nats.key"
    cert = x509.load_pem_x509_certificate((nats_dir / "nats.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "data" / "pki" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nats"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_a_second_run_keeps_every_key_password_and_certificate(tmp_path: Path) -> None:
    args = ("--nats-host", "nats", "--nats-conf-dir", "/etc/twinhub")
    out = export(tmp_path, *args)
    before = digest(tmp_path)
    assert export(tmp_path, *args) == out
    assert digest(tmp_path) == before


def test_stale_files_go_and_a_certificate_follows_the_names(tmp_path: Path) -> None:
    out = export(tmp_path, "--nats-host", "nats")
    first = (out / "nats" / "nats.crt").read_bytes()
    (out / "gateway" / "twin.nk").write_bytes(b"left over")
    (out / "nats" / "old.conf").write_text("{}")
    (out / "twin").chmod(0o755)
    export(tmp_path, "--nats-host", "nats", "--nats-host", "localhost")
    assert [p.name for p in (out / "gateway").iterdir()] == ["gateway.nk"]
    assert mode(out / "twin") == 0o700
    second = (out / "nats" / "nats.crt").read_bytes()
    assert second != first
    cert = x509.load_pem_x509_certificate(second)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["localhost", "nats"]
    export(tmp_path)  # no TLS any more: no certificate left
    assert sorted(p.name for p in (out / "nats").iterdir()) == ["nats.conf"]


def test_a_directory_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export(tmp_path)
    me = os.geteuid()
    monkeypatch.setattr(initbus.os, "geteuid", lambda: me + 1)
    rc, _, err = init(tmp_path, "--bus-export", str(tmp_path / "export"))
    assert rc == 1
    assert f"belongs to uid {me}, not to the user running init ({me + 1})" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nats-host", "nats"], "--nats-host needs --bus-export"),
        (["--nats-conf-dir", "/etc/twinhub"], "--nats-conf-dir needs --bus-export"),
        (["--mongo-conf-dir", "/run/x"], "--mongo-conf-dir needs --bus-export"),
        (["--bus-export", "e", "--nats-conf-dir", "etc"], "--nats-conf-dir must be an absolute"),
    ],
)
def test_usage_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    rc, _, err = init(tmp_path, *extra)
    assert rc == 2
    assert message in err
    assert not (tmp_path / "data").exists()


def test_without_export_init_writes_no_passwords(tmp_path: Path) -> None:
    rc, _, err = init(tmp_path)
    assert rc == 0, err
    assert BusCredentials(tmp_path / "bus").exists()
    assert not (tmp_path / "bus" / "mongo-root-password").exists()


def test_the_mongo_user_and_database_come_from_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWINHUB_MONGO_USERNAME", "twin-svc")
    monkeypatch.setenv("TWINHUB_MONGO_DATABASE", "hub")
    out = export(tmp_path, "--mongo-conf-dir", "/run/secrets/m")
    script = (out / "mongo-initdb" / "twinhub-users.js").read_text()
    assert '"/run/secrets/m/mongo-twin-password"' in script
    assert 'getSiblingDB("hub")' in script
    assert 'user: "twin-svc"' in script
    for password in ("mongo-root-password", "mongo-twin-password"):
        assert (tmp_path / "bus" / password).read_text() not in script


# -- the initdb script, run by node with a stand-in for mongosh's db ----------------------------

HARNESS = """
const calls = [];
const existing = process.argv[3] === "exists";
globalThis.db = {
  getSiblingDB: (name) => ({
    getUser: (user) => { calls.push(["getUser", name, user]); return existing ? {} : null; },
    createUser: (spec) => { calls.push(["createUser", name, spec]); },
  }),
};
try {
  require(process.argv[2]);
} catch (e) {
  calls.push(["error", String(e.message)]);
}
console.log(JSON.stringify(calls));
"""


def run_script(tmp_path: Path, script: str, *, exists: bool = False) -> list[list[object]]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (runs the mongosh initdb script)")
    path = tmp_path / "script.js"
    path.write_text(script)
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    done = subprocess.run(
        [node, str(harness), str(path), "exists" if exists else "new"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    calls: list[list[object]] = json.loads(done.stdout)
    return calls


def test_the_initdb_script_creates_the_twin_user_with_the_password_of_the_file(
    tmp_path: Path,
) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text("s3cret\n")
    script = initbus.initdb_script(user="twinhub", database="hub", password_file=password_file)
    assert "s3cret" not in script
    assert run_script(tmp_path, script) == [
        ["getUser", "hub", "twinhub"],
        [
            "createUser",
            "hub",
            {"user": "twinhub", "pwd": "s3cret", "roles": [{"role": "readWrite", "db": "hub"}]},
        ],
    ]
    # a user that exists is left alone; an empty password file stops the script
    assert run_script(tmp_path, script, exists=True) == [["getUser", "hub", "twinhub"]]
    password_file.write_text("")
    calls = run_script(tmp_path, script)
    assert calls[-1][0] == "error"
    assert "is empty" in str(calls[-1][1])


def test_the_initdb_script_quotes_what_it_is_given(tmp_path: Path) -> None:
    password_file = tmp_path / 'a "quoted" dir' / "pw"
    password_file.parent.mkdir()
    password_file.write_text("pw")
    script = initbus.initdb_script(
        user='x"); db.dropDatabase("', database="d", password_file=password_file
    )
    calls = run_script(tmp_path, script)
    assert calls[-1][0] == "createUser"
    assert calls[-1][2] == {
        "user": 'x"); db.dropDatabase("',
        "pwd": "pw",
        "roles": [{"role": "readWrite", "db": "d"}],
    }


def test_a_nats_cluster_members_configuration(tmp_path: Path) -> None:
    """--nats-route: nats-cluster.conf beside nats.conf, the routes to every member admitted
    with the bus directory's route password, TLS routes verified with the CA copied beside it;
    nats-server accepts it."""
    routes = ["n1:6222", "n2:6222", "n3:6222"]
    extra = [w for r in routes for w in ("--nats-route", r)]
    out = export(tmp_path, "--nats-host", "n1", "--nats-host", "n2", "--nats-host", "n3", *extra)
    nats_dir = out / "nats"
    assert sorted(p.name for p in nats_dir.iterdir()) == [
        "ca.crt",
        "nats-cluster.conf",
        "nats.conf",
        "nats.crt",
        "nats.key",
    ]
    assert {mode(p) for p in nats_dir.iterdir()} == {0o600}
    assert (nats_dir / "ca.crt").read_bytes() == (tmp_path / "data" / "pki" / "ca.crt").read_bytes()
    single = json.loads((nats_dir / "nats.conf").read_text())
    conf = json.loads((nats_dir / "nats-cluster.conf").read_text())
    cluster = conf.pop("cluster")
    assert conf == single and "cluster" not in single
    password = (tmp_path / "bus" / "route-password").read_text().strip()
    assert mode(tmp_path / "bus" / "route-password") == 0o600
    assert cluster["authorization"]["password"] == password
    assert cluster["routes"] == [f"nats-route://twinhub-route:{password}@{r}" for r in routes]
    assert (cluster["host"], cluster["port"]) == ("0.0.0.0", 6222)
    assert cluster["tls"]["ca_file"] == str((nats_dir / "ca.crt").resolve())
    nats_server = str(find_nats_server_binary())
    done = subprocess.run(
        [nats_server, "-t", "-c", str(nats_dir / "nats-cluster.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # the routes' password and the rest are kept on a second run; without routes the cluster
    # configuration goes
    export(tmp_path, "--nats-host", "n1", "--nats-host", "n2", "--nats-host", "n3", *extra)
    assert (tmp_path / "bus" / "route-password").read_text().strip() == password
    export(tmp_path)
    assert sorted(p.name for p in nats_dir.iterdir()) == ["nats.conf"]


def test_nats_routes_need_an_export(tmp_path: Path) -> None:
    rc, _, err = init(tmp_path, "--nats-route", "n1:6222")
    assert (rc, "--nats-route needs --bus-export" in err) == (2, True), err


@pytest.mark.parametrize(
    ("routes", "error"),
    [
        (["n1:6222", "n2:6222"], "at least 3 members"),
        (["n1:6222", "n2:6222", "n3:6333"], "the same port"),
        (["n1:6222", "n2:6222", "n3"], "expected HOST:PORT"),
    ],
)
def test_bad_nats_routes_are_refused(tmp_path: Path, routes: list[str], error: str) -> None:
    extra = [w for r in routes for w in ("--nats-route", r)]
    rc, _, err = init(tmp_path, "--bus-export", str(tmp_path / "export"), *extra)
    assert (rc, error in err) == (2, True), err


def test_the_replica_set_key_is_base64_of_512_random_bytes(tmp_path: Path) -> None:
    out = export(tmp_path)
    key = (out / "mongo" / "mongo-keyfile").read_bytes()
    assert key == (tmp_path / "bus" / "mongo-keyfile").read_bytes()
    assert len(base64.b64decode(key, validate=True)) == 512
    export(tmp_path)
    assert (out / "mongo" / "mongo-keyfile").read_bytes() == key  # kept
