"""The exception tree of :mod:`devicesim`.

Every error a simulated device or the fleet runner raises derives from :class:`SimError`; each
subclass also inherits the builtin it resembles, so callers may catch either. aiocoap and socket
errors are translated where they happen (``transport.py``, ``device.py``).
"""

from __future__ import annotations


class SimError(Exception):
    """Root of every error raised by :mod:`devicesim`."""


class SimConfigError(SimError, ValueError):
    """The simulator was given an invalid configuration (URI, TLS files, counts)."""


class SimConnectionError(SimError, ConnectionError):
    """The connection to the gateway could not be opened, or it was lost mid-exchange."""


class SimTimeoutError(SimError, TimeoutError):
    """The gateway did not answer in time."""


class SimProtocolError(SimError, ValueError):
    """The gateway answered with an unexpected code or payload.

    ``operation`` names the exchange (``sign-up``, ``sign-in``…), ``code`` the CoAP response code
    as ``"c.dd"`` when there was a response.
    """

    def __init__(self, operation: str, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{operation}: {message}")
        self.operation = operation
        self.code = code


class SimUnauthorizedError(SimProtocolError):
    """The gateway refused the credentials (4.01/4.03): refresh the token or sign up again."""
