"""The retry policy of deliveries: exponential backoff with jitter, capped, no attempt limit.

A study that could not be delivered is never dropped: it waits in the spool and is
tried again, forever, each wait longer than the last up to `max_backoff`. The jitter
(50-100 % of the delay) keeps many studies that failed together (a FHIR server that
was down) from all retrying at the same moment. A server's Retry-After is honoured
as a lower bound, still capped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """base: seconds before the first retry; max_backoff: the longest wait (fhir.max_backoff)."""

    base: float = 1.0
    max_backoff: float = 300.0

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ValueError(f"base: expected a positive number of seconds, got {self.base!r}")
        if not self.max_backoff > 0:
            raise ValueError(f"max_backoff: expected a positive number of seconds, got {self.max_backoff!r}")

    def delay(self, attempt: int, *, retry_after: float | None = None,
              rand: Callable[[], float] = random.random) -> float:
        """Seconds before attempt+1: base·2^(attempt-1), jittered to 50-100 %, at least retry_after,
        at most max_backoff."""
        if attempt < 1:
            raise ValueError(f"attempt: expected 1 or more, got {attempt!r}")
        delay = min(self.max_backoff, self.base * 2 ** min(attempt - 1, 62))
        delay *= 0.5 + rand() / 2
        if retry_after:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff)
