"""Token validation, shared by the gateway (devices), the command API and the NATS auth callout
(applications).

* :mod:`auth.errors` — the exception tree (callers translate it at their seam);
* :mod:`auth.tokens` — :class:`~auth.tokens.JwtValidator`, key sets, the development issuer;
* :mod:`auth.jwks` — keys from a JWKS URL, refreshed on demand, and the HTTP helpers;
* :mod:`auth.application` — the rules an application token obeys on top of the JWT checks.

Imports nothing else of ours; validation itself does no I/O (key refreshes do, on request).
"""
