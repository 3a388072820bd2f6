"""Scripted conversations with the sans-IO session core."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from auth.tokens import JwtValidator, TokenIssuer
from gateway import session as s
from proto import events

E = TypeVar("E")
NOW = 1_800_000_000.0
OCF = 10000


def make_issuer() -> TokenIssuer:
    return TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="k1")


@dataclass
class Play:
    """One session and a stand-in for the log's registrations.

    ``owners`` is what the log says about each device's owner: ``LoadOwner`` effects are
    answered from it at once (unless ``auto_owner`` is off), and acknowledged appends of
    registrations update it.
    """

    issuer: TokenIssuer = field(default_factory=make_issuer)
    batch: bool = True
    access_ttl: float | None = 3600.0
    now: float = NOW
    rid: int = 0
    cert_device_id: str | None = None
    cert_expires_at: float | None = None
    device_claim: str | None = None
    auto_owner: bool = True
    owners: dict[str, str] = field(default_factory=dict)
    session: s.Session = field(init=False)

    def __post_init__(self) -> None:
        cfg = s.SessionConfig(
            gateway_id="g1",
            connection_id="c1",
            remote_address="127.0.0.1:5000",
            batch_observe=self.batch,
            access_ttl=self.access_ttl,
            cert_device_id=self.cert_device_id,
            cert_expires_at=self.cert_expires_at,
        )
        self.issuer.device_claim = self.device_claim
        validator = JwtValidator(self.issuer.public_keys, device_claim=self.device_claim)
        self.session = s.Session(cfg, validator, self.issuer)

    def token(self, owner: str = "alice", device: str | None = None, ttl: float = 600) -> str:
        return self.issuer.issue(owner, now=self.now, ttl=ttl, device_id=device)

    def feed(self, inp: s.Input) -> list[s.Effect]:
        return self._answer_owners(self.session.handle(inp, self.now))

    def _answer_owners(self, effects: list[s.Effect]) -> list[s.Effect]:
        if not self.auto_owner:
            return effects
        out: list[s.Effect] = []
        for e in effects:
            if isinstance(e, s.LoadOwner):
                loaded = s.OwnerLoaded(e.ref, self.owners.get(e.device_id))
                out += self._answer_owners(self.session.handle(loaded, self.now))
            else:
                out.append(e)
        return out

    def record(self, effects: list[s.Effect]) -> None:
        """The appends among ``effects`` are in the log: keep track of registrations."""
        for ev in appended(effects):
            if isinstance(ev.data, events.DeviceRegistered):
                self.owners[ev.device_id] = ev.owner
            elif isinstance(ev.data, events.DeviceUnregistered):
                self.owners.pop(ev.device_id, None)

    def request(
        self, method: str, path: str, body: Any = None, query: tuple[str, ...] = (), cf: int = OCF
    ) -> list[s.Effect]:
        self.rid += 1
        payload = b"" if body is None else cbor2.dumps(body)
        return self.feed(s.DeviceRequest(self.rid, method, path, query, payload, cf))

    def ack(self, effects: list[s.Effect]) -> list[s.Effect]:
        """Acknowledge every Append among the effects; return all that follows."""
        self.record(effects)
        out: list[s.Effect] = []
        for e in effects:
            if isinstance(e, s.Append):
                out += self.feed(s.AppendResult(e.ref, True))
        return out

    def sign_up(self, device: str = "d1", owner: str = "alice") -> dict[str, Any]:
        effects = self.request(
            "POST",
            "/oic/sec/account",
            {"di": device, "accesstoken": self.token(owner), "authprovider": "twinhub"},
        )
        reply = one(self.ack(effects), s.Respond)
        assert reply.code == "2.04"
        body: dict[str, Any] = cbor2.loads(reply.payload)
        return body

    def sign_in(self, device: str = "d1") -> list[s.Effect]:
        tokens = self.sign_up(device)
        effects = self.request(
            "POST",
            "/oic/sec/session",
            {
                "di": device,
                "uid": tokens["uid"],
                "accesstoken": tokens["accesstoken"],
                "login": True,
            },
        )
        return self.ack(effects)


def of(effects: list[s.Effect], kind: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


def one(effects: list[s.Effect], kind: type[E]) -> E:
    found = of(effects, kind)
    assert len(found) == 1, f"expected one {kind.__name__} in {effects}"
    return found[0]


def appended(effects: list[s.Effect]) -> list[events.AnyEvent]:
    return [ev for a in of(effects, s.Append) for ev in a.events]


def reply(code: str = "2.05", body: Any = None, observe: int | None = None) -> s.Reply:
    return s.Reply(code, b"" if body is None else cbor2.dumps(body), OCF, observe=observe)
