"""The errors a client sees: each names the HTTP status and OpenAI error code the API answers with.

Separate because every layer of the router raises them and `helix.worker.api` turns them into
responses: neither side should have to import the router's machinery to name a failure.
"""

from __future__ import annotations


class RouterError(Exception):
    """A request the router could not serve; `http_status` and `code` become the API's answer."""

    http_status = 500
    code = "internal_error"
    status = "error"  # helix_requests_total label

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(RouterError):
    """The cluster is full and the wait queue is full, or the wait timed out: try again later."""

    http_status = 429
    code = "rate_limit_exceeded"
    status = "rejected"


class Unavailable(RouterError):
    """No complete route is up (workers down or not started yet), or the router is stopping."""

    http_status = 503
    code = "service_unavailable"
    status = "unavailable"


class TooLarge(RouterError):
    """No route could ever hold this request's KV cache, even with nothing else running."""

    http_status = 400
    code = "context_length_exceeded"
    status = "invalid"


class RequestTimeout(RouterError):
    """The request ran past its deadline (stuck or too slow)."""

    http_status = 504
    code = "timeout"
    status = "timeout"


class RequestFailed(RouterError):
    """Every attempt failed (workers kept erroring)."""

    http_status = 502
    code = "upstream_error"
    status = "error"
