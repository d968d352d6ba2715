"""Time in the tests: a fake clock for code that takes one, and `wait_for` for real peers.

Code under test that takes a clock (CompletionTracker, DeliveryWorker) gets a FakeClock
and the test moves time by hand: no sleeps. `wait_for` is only for what runs on its own
(a node subprocess, Orthanc, the FHIR engine, a node's threads): it polls until a condition holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class FakeClock:
    """A monotonic clock that moves only when the test sets `now`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_for(predicate: Callable[[], object], timeout: float = 20, what: str = "a condition",
             ignore: tuple[type[BaseException], ...] = (), interval: float = 0.05) -> object:
    """Poll predicate until it returns something true (returned); AssertionError after timeout.

    Exceptions of the types in `ignore` count as "not yet" (e.g. OSError while a peer starts).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except ignore:
            result = None
        if result:
            return result
        time.sleep(interval)  # polling what runs on its own: real time is what passes there
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
