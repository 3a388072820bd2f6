"""Who may do what on the bus: the NATS permissions of twinhub's services and of applications.

Two accounts keep applications away from the log (see docs/architecture.md, "The bus"):

* ``TWINHUB`` holds the event stream and twinhub's own processes. Each service connects with
  an NKey of its own and gets only the subjects it uses (:func:`service_permissions`).
* ``APPS`` holds every application, placed there by the auth callout with permissions scoped
  to the owner of its token (:func:`application_permissions`). APPS has no JetStream of its
  own: it imports from TWINHUB the command API, the live events and the few JetStream
  consumer operations an application needs, under :data:`APP_JS_PREFIX`. A request that
  crosses an import gets its reply subject rewritten by the server, so nothing an application
  names as a reply subject can land in the log (a reply into ``twinhub.ev.…`` of APPS reaches
  no stream).

NATS matches permissions by whole subject tokens, and a consumer name is one token: a
permission cannot say "names starting with O". An application may create consumers only with
a filter under its owner's subjects (the filtered create subject carries the filter); pulling,
inspecting and deleting go by name, so a consumer's name is its capability: the client derives
names no other owner can guess (``twinhub_client.consumer_name``), the server never lists
consumers to applications, and the names of twinhub's own consumers are denied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from proto import api, devtokens, leases, selfprovision, subjects

__all__ = [
    "ACCOUNT_APPS",
    "ACCOUNT_AUTH",
    "ACCOUNT_TWINHUB",
    "APP_JS_PREFIX",
    "ROLES",
    "Permissions",
    "Role",
    "application_permissions",
    "inbox_prefix",
    "service_permissions",
]

ACCOUNT_TWINHUB: Final = "TWINHUB"
ACCOUNT_APPS: Final = "APPS"
ACCOUNT_AUTH: Final = "AUTH"
ACCOUNT_SYS: Final = "SYS"

APP_JS_PREFIX: Final = api.APP_JS_PREFIX
"""Where applications reach JetStream: the imports of APPS map it to TWINHUB's ``$JS.API``."""

API_SUBJECTS: Final = "twinhub.api.v1.>"
EVENTS: Final = "twinhub.ev.>"
LEASE_STREAM: Final = leases.LEASE_STREAM
GATEWAY_LEASES: Final = leases.GATEWAY_SUBJECTS  # what a gateway writes of its lease
TWIN_LEASES: Final = leases.TWIN_SUBJECTS  # the twin service's claims of lost instances
TOKEN_STREAM: Final = devtokens.TOKEN_STREAM
DEVICE_TOKENS: Final = devtokens.ALL_TOKENS  # the hashed access tokens of simple devices
CALLOUT_SUBJECT: Final = "$SYS.REQ.USER.AUTH"
SELF_PROVISION: Final = selfprovision.SUBJECT  # a device's self-provisioning, gateway -> twin

Role = Literal["gateway", "twin", "callout", "admin"]
ROLES: Final[tuple[Role, ...]] = ("gateway", "twin", "callout", "admin")


@dataclass(frozen=True, slots=True)
class Permissions:
    """Publish / subscribe allow and deny lists; ``responses`` lets a responder answer the
    requests it received (NATS ``allow_responses``) without a publish permission on replies."""

    pub_allow: tuple[str, ...] = ()
    pub_deny: tuple[str, ...] = ()
    sub_allow: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()
    responses: bool = False
    unrestricted: bool = field(default=False)


def inbox_prefix(name: str) -> str:
    """The reply-subject prefix of a service role or of an application's owner token."""
    return f"_INBOX.{name}"


def _consumers_api(stream: str) -> tuple[str, ...]:
    return (
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
    )


def _reads(stream: str) -> tuple[str, ...]:
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
    )


def _deny_consumers(prefix: str, stream: str, names: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        out += [
            f"{prefix}.CONSUMER.CREATE.{stream}.{name}",
            f"{prefix}.CONSUMER.CREATE.{stream}.{name}.>",
            f"{prefix}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
            f"{prefix}.CONSUMER.DELETE.{stream}.{name}",
            f"{prefix}.CONSUMER.MSG.NEXT.{stream}.{name}",  # a pull takes events from it
            f"$JS.ACK.{stream}.{name}.>",
        ]
    return tuple(out)


def service_permissions(
    role: Role,
    stream: str,
    projector: str,
    lease_stream: str = LEASE_STREAM,
    token_stream: str = TOKEN_STREAM,
) -> Permissions:
    """What each of twinhub's processes may do in the TWINHUB (``callout``: AUTH) account.

    * gateway: append events, read the log (direct gets, throw-away consumers), hear the
      command events of its devices; write its lease (``twinhub.lease.gw.>`` only) and read
      the lease stream; never create, change or delete a stream, never touch the projector's
      consumer.
    * twin: the same for the log, plus provisioning both streams (create / update, never
      delete or purge), its durable projector consumer, and answering the command API; of the
      leases it reads them all and writes only its claims (``twinhub.lease.twin.>``).
    * callout: answer the server's authorization requests, nothing else.
    * admin: everything (the explicit admin path of the CLI: rebuild, maintenance, tests).

    The simple devices' token registry (``twinhub.devtoken.>``, hashes only): the gateway reads
    it (direct gets by subject), the twin service provisions it, reads it and writes it (its
    provisioning operations).

    Self-provisioning (``twinhub.svc.provision``, :mod:`proto.selfprovision`): the gateway
    relays a device's request (publishes it, the reply comes to its inbox), the twin service
    answers it (subscribes, answers through ``responses``) -- never the other way round: a
    gateway cannot answer in the twin's place, the twin cannot send itself requests.

    Applications get nothing of the leases, the token registry or self-provisioning: APPS
    imports none of it.
    """
    if role == "admin":
        return Permissions(unrestricted=True)
    if role == "callout":
        return Permissions(sub_allow=(CALLOUT_SUBJECT,), responses=True)
    common_pub = (
        EVENTS,
        "$JS.API.INFO",
        *_reads(stream),
        *_consumers_api(stream),
        *_reads(lease_stream),
        *_consumers_api(lease_stream),
        *_reads(token_stream),
    )
    common_sub = (EVENTS, f"{inbox_prefix(role)}.>")
    if role == "gateway":
        return Permissions(
            pub_allow=(*common_pub, GATEWAY_LEASES, SELF_PROVISION),
            pub_deny=_deny_consumers("$JS.API", stream, [projector]),
            sub_allow=common_sub,
        )
    return Permissions(
        pub_allow=(
            *common_pub,
            TWIN_LEASES,
            DEVICE_TOKENS,
            *_consumers_api(token_stream),
            f"$JS.API.STREAM.CREATE.{token_stream}",
            f"$JS.API.STREAM.UPDATE.{token_stream}",
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
            f"$JS.API.STREAM.CREATE.{lease_stream}",
            f"$JS.API.STREAM.UPDATE.{lease_stream}",
        ),
        sub_allow=(*common_sub, API_SUBJECTS, SELF_PROVISION),
        responses=True,
    )


def application_permissions(owner: str, stream: str, reserved: Sequence[str]) -> Permissions:
    """What an application of ``owner`` may do in APPS (the auth callout grants it):

    * requests on the command API, replies only on ``_INBOX.<owner>.>``;
    * live events of its owner only (``twinhub.ev.<owner>.>``), never a publish into them;
    * consumers on the event stream created only with a filter under ``twinhub.ev.<owner>.``;
      pull, inspect, acknowledge and delete by name; never a stream operation, a direct get,
      a consumer list; the consumers named in ``reserved`` (twinhub's own) not at all.
    """
    tok = subjects.escape_token(owner)
    js = APP_JS_PREFIX
    return Permissions(
        pub_allow=(
            API_SUBJECTS,
            f"{js}.CONSUMER.CREATE.{stream}.*.twinhub.ev.{tok}.>",
            f"{js}.CONSUMER.MSG.NEXT.{stream}.*",
            f"{js}.CONSUMER.INFO.{stream}.*",
            f"{js}.CONSUMER.DELETE.{stream}.*",
            f"$JS.ACK.{stream}.>",
        ),
        pub_deny=(
            *(
                f"{js}.CONSUMER.{op}.{stream}.{name}"
                for name in reserved
                for op in ("INFO", "DELETE")
            ),
            *(f"{js}.CONSUMER.MSG.NEXT.{stream}.{name}" for name in reserved),
            *(f"{js}.CONSUMER.CREATE.{stream}.{name}.>" for name in reserved),
            *(f"$JS.ACK.{stream}.{name}.>" for name in reserved),
        ),
        sub_allow=(f"twinhub.ev.{tok}.>", f"{subjects.owner_inbox_prefix(owner)}.>"),
    )


def app_imports(stream: str) -> tuple[tuple[str, str, str | None], ...]:
    """What APPS imports from TWINHUB: (kind, subject in TWINHUB, subject in APPS or None)."""
    js = APP_JS_PREFIX
    return (
        ("service", API_SUBJECTS, None),
        ("stream", EVENTS, None),
        ("service", f"$JS.API.CONSUMER.CREATE.{stream}.>", f"{js}.CONSUMER.CREATE.{stream}.>"),
        ("service", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*", f"{js}.CONSUMER.MSG.NEXT.{stream}.*"),
        ("service", f"$JS.API.CONSUMER.INFO.{stream}.*", f"{js}.CONSUMER.INFO.{stream}.*"),
        ("service", f"$JS.API.CONSUMER.DELETE.{stream}.*", f"{js}.CONSUMER.DELETE.{stream}.*"),
        ("service", f"$JS.ACK.{stream}.>", None),
    )
