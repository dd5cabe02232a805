"""Retry policy as a pure decision: given an error and the attempt number, wait how long?

The loop that sleeps lives in ``_send.py``; this module only decides.
"""

from __future__ import annotations

import random

from ._config import RetryPolicy
from ._exceptions import (
    AmplitudeError,
    LinkExpiredError,
    RateLimitError,
    ServerError,
    TransportError,
)

__all__ = ("backoff", "decide")


def backoff(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform(0, min(max_delay, initial_delay * 2**(attempt-1)))."""
    ceiling = min(policy.max_delay, policy.initial_delay * 2 ** max(0, attempt - 1))
    return rng.uniform(0.0, ceiling)


def decide(
    error: AmplitudeError, attempt: int, policy: RetryPolicy, rng: random.Random
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or None to give up and raise ``error``.

    Retried: 429 (after Retry-After, capped at ``max_retry_after``), 5xx and transport errors,
    and at once an expired presigned link (a fresh one is one ``/file`` call away).
    Never retried: any other 4xx, a refused connection, a host name that does not resolve,
    validation errors, quota errors.
    """
    if attempt >= policy.max_attempts:
        return None
    if isinstance(error, LinkExpiredError):
        return 0.0
    if isinstance(error, RateLimitError):
        if error.retry_after is not None:
            return min(error.retry_after, policy.max_retry_after)
        return backoff(policy, attempt, rng)
    if isinstance(error, TransportError) and (error.refused or error.unresolved):
        return None  # nothing listens there, or no such host: fail fast, not after backoff
    if isinstance(error, ServerError | TransportError):
        return backoff(policy, attempt, rng)
    return None
