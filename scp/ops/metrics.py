"""Counters of what the node did since it started (exported by scp.ops.http).

The node's threads (association handlers, the delivery worker) increment them
concurrently, so every update holds a lock; a snapshot is a consistent copy.
The set of names is fixed: a misspelt name is a bug, not a new counter.
"""

from __future__ import annotations

import threading

COUNTERS: dict[str, str] = {
    "instances_received": "Instances stored in the spool and acknowledged with success.",
    "instances_failed": "Instances answered with a failure status.",
    "associations": "Associations accepted.",
    "studies_completed": "Studies that reached the idle timeout and were handed to delivery.",
    "deliveries_ok": "Study deliveries that succeeded on every sink.",
    "deliveries_failed": "Study delivery attempts that failed (retried later or dead-lettered).",
}


class Metrics:
    """Thread-safe monotonic counters with the names in COUNTERS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTERS, 0)

    def inc(self, name: str, n: int = 1) -> None:
        if name not in self._values:
            raise ValueError(f"name: unknown counter {name!r}; known: {sorted(COUNTERS)}")
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n: expected an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n: counters only go up, got {n}")
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
