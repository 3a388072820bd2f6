"""twinhub's Python client: commands, desired state, queries and gap-free event subscriptions.

:class:`TwinhubClient` is the entry point (see :mod:`twinhub_client.client`);
:class:`EventSubscription` what :meth:`TwinhubClient.subscribe` returns; errors in
:mod:`twinhub_client.errors`.
"""

from twinhub_client.client import OUTCOME_KINDS, TwinhubClient, event_filters
from twinhub_client.errors import (
    ApiError,
    BadRequestError,
    ConflictError,
    ForbiddenError,
    InternalError,
    NotFoundError,
    OutcomeTimeoutError,
    ServiceUnavailableError,
    TwinhubError,
    UnauthorizedError,
)
from twinhub_client.subscription import EventSubscription

__all__ = [
    "OUTCOME_KINDS",
    "ApiError",
    "BadRequestError",
    "ConflictError",
    "EventSubscription",
    "ForbiddenError",
    "InternalError",
    "NotFoundError",
    "OutcomeTimeoutError",
    "ServiceUnavailableError",
    "TwinhubClient",
    "TwinhubError",
    "UnauthorizedError",
    "event_filters",
]
