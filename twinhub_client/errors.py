"""The client's exception tree, one root; each API error code is a subclass.

::

    TwinhubError
    ├── ApiError                         the service answered with an error (``code``, ``message``)
    │   ├── BadRequestError   (also ValueError)       bad_request
    │   ├── UnauthorizedError (also PermissionError)  unauthorized
    │   ├── ForbiddenError    (also PermissionError)  forbidden
    │   ├── NotFoundError     (also LookupError)      not_found
    │   ├── ConflictError                             conflict (e.g. a correlation id that
    │   │                                             names another command of the device)
    │   ├── ServiceUnavailableError (also ConnectionError)  unavailable (also: no service, timeout)
    │   └── InternalError                             internal
    └── OutcomeTimeoutError   (also TimeoutError)     ``wait=True`` saw no outcome in time

NATS errors are translated at the seam: nothing from ``nats`` leaks.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ApiError",
    "BadRequestError",
    "ConflictError",
    "ForbiddenError",
    "InternalError",
    "NotFoundError",
    "OutcomeTimeoutError",
    "ServiceUnavailableError",
    "TwinhubError",
    "UnauthorizedError",
    "api_error",
]


class TwinhubError(Exception):
    """Root of every error the client raises."""


class ApiError(TwinhubError):
    code: str = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(f"{self.code}: {message}")


class BadRequestError(ApiError, ValueError):
    code = "bad_request"


class UnauthorizedError(ApiError, PermissionError):
    code = "unauthorized"


class ForbiddenError(ApiError, PermissionError):
    code = "forbidden"


class NotFoundError(ApiError, LookupError):
    code = "not_found"


class ConflictError(ApiError):
    code = "conflict"


class ServiceUnavailableError(ApiError, ConnectionError):
    code = "unavailable"


class InternalError(ApiError):
    code = "internal"


class OutcomeTimeoutError(TwinhubError, TimeoutError):
    """A command's outcome event did not come in time (the command may still end later)."""


_BY_CODE: Final[dict[str, type[ApiError]]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        UnauthorizedError,
        ForbiddenError,
        NotFoundError,
        ConflictError,
        ServiceUnavailableError,
        InternalError,
    )
}


def api_error(code: str, message: str) -> ApiError:
    """The exception for an error reply (an unknown code gives a plain :class:`ApiError`)."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else ApiError(message, code)
