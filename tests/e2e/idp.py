"""A small OAuth2 / OIDC provider on loopback: a real HTTP server in a thread.

It serves the discovery document, a JWKS of its current signing keys (fetches counted) and a
token endpoint that trades a one-time authorization code for a signed JWT (``access_token``
and ``id_token``); anything else is refused as an OAuth2 error. ``rotate()`` makes a new key
(a new ``kid``) the signing one; ``stop()`` takes the provider down (its port then refuses).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm


@dataclass
class Idp:
    client_id: str = "twinhub-gw"
    client_secret: str = "s3cret"
    keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    kid: str = ""
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)  # code -> extra claims
    jwks_fetches: int = 0
    token_requests: list[dict[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def __post_init__(self) -> None:
        self.rotate()

    # -- the provider's state --------------------------------------------------------------

    def rotate(self) -> str:
        self.kid = "k-" + uuid.uuid4().hex[:8]
        self.keys[self.kid] = ec.generate_private_key(ec.SECP256R1())
        return self.kid

    def code(self, owner: str, **claims: Any) -> str:
        c = "code-" + uuid.uuid4().hex
        self.codes[c] = {"sub": owner, **claims}
        return c

    def sign(self, claims: dict[str, Any], kid: str | None = None) -> str:
        kid = kid or self.kid
        now = int(time.time())
        body = {"iss": self.url, "aud": self.client_id, "iat": now, "exp": now + 600} | claims
        return jwt.encode(body, self.keys[kid], algorithm="ES256", headers={"kid": kid})

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            out.append(jwk | {"kid": kid, "alg": "ES256", "use": "sig"})
        # a symmetric key must never be taken as a verification key
        out.append({"kty": "oct", "kid": "hs", "alg": "HS256", "k": "c2VjcmV0"})
        return {"keys": out}

    # -- the server -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Idp:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _json(self, status: int, doc: Any) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    self._json(
                        200,
                        {
                            "issuer": idp.url,
                            "token_endpoint": idp.url + "/token",
                            "jwks_uri": idp.url + "/jwks",
                        },
                    )
                elif self.path == "/jwks":
                    idp.jwks_fetches += 1
                    self._json(200, idp.jwks())
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(n).decode()))
                idp.token_requests.append(form)
                if self.path != "/token":
                    return self._json(404, {"error": "not_found"})
                ctype = self.headers.get("Content-Type", "")
                if ctype != "application/x-www-form-urlencoded":
                    return self._json(400, {"error": "invalid_request"})
                if (form.get("client_id"), form.get("client_secret")) != (
                    idp.client_id,
                    idp.client_secret,
                ):
                    return self._json(401, {"error": "invalid_client"})
                if form.get("grant_type") != "authorization_code":
                    return self._json(400, {"error": "unsupported_grant_type"})
                claims = idp.codes.pop(form.get("code", ""), None)  # single use
                if claims is None:
                    return self._json(400, {"error": "invalid_grant"})
                token = idp.sign(claims)
                self._json(
                    200,
                    {
                        "access_token": token,
                        "id_token": token,
                        "token_type": "Bearer",
                        "expires_in": 600,
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="idp", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
