"""The service's exceptions: each carries its HTTP status and the SDK's error category.

They live apart from the engine so that small helpers (number checks, the optimizer
step) can raise a user error without importing the engine, which imports them.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error with an HTTP status and the SDK's error category."""

    status_code = 500
    category = "server"


class UserError(ServiceError):
    """The request was wrong; the message says what to change."""

    status_code = 400
    category = "user"


class NotFound(UserError):
    status_code = 404


class TooLarge(UserError):
    status_code = 413


class Busy(ServiceError):
    """The queue is full: the SDK retries 429 with backoff, which is the backpressure."""

    status_code = 429
