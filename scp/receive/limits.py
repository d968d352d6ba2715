"""Connection limits: how many associations at once, from one address and in all, and how
long a connection may take to ask for one.

- node.max_associations and node.max_associations_per_peer count associations whose
  A-ASSOCIATE-RQ arrived and was admitted, until their connection closes. One over either
  limit is refused with A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded
  (scp.receive.status.REJECT_LIMIT): the sender may retry later. Connections that have not
  sent a request yet do not count, so silent ones cannot keep senders out.
- node.request_timeout: a connection must complete its A-ASSOCIATE-RQ within it, else it is
  closed (scp.receive.transport.guard_connection bounds the reads and pynetdicom's timers).
- Floods are logged without flooding the log: one line per address and reason per
  LOG_INTERVAL, counting the connections since the previous line (`RateLimitedLog`).

The counting (`admit`) and the log's rate limit take a clock; no pynetdicom internals here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from scp.config import NodeConfig
from scp.receive import transport
from scp.receive.status import REJECT_LIMIT

log = logging.getLogger("scp.receive.limits")

LOG_INTERVAL = 60.0  # seconds between two lines about the same address and reason
MAX_LOG_KEYS = 4096  # addresses remembered by the rate limit (a flood from many addresses stays bounded)
TIMER_SLACK = 0.9  # pynetdicom's timers fire on a poll: a close at 90 % of request_timeout is the timeout

Refusal = tuple[tuple[int, int, int], str]


class RateLimitedLog:
    """Decides when a line about `key` is due: the first at once, then at most one per interval,
    each counting the events since the previous line."""

    def __init__(self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = MAX_LOG_KEYS) -> None:
        if interval < 0:
            raise ValueError(f"interval: expected 0 or more seconds, got {interval!r}")
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._last: dict[object, float] = {}  # key -> when its last line was due
        self._counts: dict[object, int] = {}  # key -> events not yet in a line
        self._lock = threading.Lock()

    def note(self, key: object) -> int | None:
        """One event: the number of events the line due now reports (this one included), or None."""
        now = self.clock()
        with self._lock:
            count = self._counts.get(key, 0) + 1
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._counts[key] = count
                return None
            self._counts.pop(key, None)
            if key not in self._last and len(self._last) >= self.max_keys:
                self._forget_quiet(now)
            self._last[key] = now
            return count

    def pending(self) -> dict[object, int]:
        """Events counted but not yet in a line, by key (reported at stop), and forgets them."""
        with self._lock:
            counts, self._counts = self._counts, {}
            return counts

    def _forget_quiet(self, now: float) -> None:
        for key in [k for k, t in self._last.items() if now - t >= self.interval and k not in self._counts]:
            del self._last[key]
        while len(self._last) >= self.max_keys:  # still full: the oldest go
            oldest = min(self._last, key=self._last.__getitem__)
            del self._last[oldest]
            self._counts.pop(oldest, None)


@dataclass(frozen=True)
class Limits:
    max_associations: int = 64
    max_associations_per_peer: int = 8

    @classmethod
    def from_config(cls, node: NodeConfig) -> "Limits":
        return cls(node.max_associations, node.max_associations_per_peer)

    def refusal(self, address: str, admitted: list[str]) -> Refusal | None:
        """None when one more association from `address` fits next to the `admitted` ones
        (their addresses), else the A-ASSOCIATE-RJ and the reason."""
        if len(admitted) >= self.max_associations:
            return REJECT_LIMIT, (f"{len(admitted)} associations open, the limit (node.max_associations = "
                                  f"{self.max_associations})")
        from_peer = sum(1 for a in admitted if a == address)
        if from_peer >= self.max_associations_per_peer:
            return REJECT_LIMIT, (f"{from_peer} associations open from {address}, the limit "
                                  f"(node.max_associations_per_peer = {self.max_associations_per_peer})")
        return None


class Admissions:
    """The associations admitted and not yet closed, by key, against the limits.

    One table per node: in one process the server's own (ConnectionLimits builds it); with
    receive workers (node.workers > 1) the coordinator's, which every worker asks
    (scp.receive.worker), so the limits hold for the node, not for each process."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._admitted: dict[Hashable, str] = {}  # key -> address
        self._lock = threading.Lock()

    def admit(self, key: Hashable, address: str) -> Refusal | None:
        """None when one more association from `address` fits (it counts under `key` until
        released), else the refusal."""
        with self._lock:
            refusal = self.limits.refusal(address, list(self._admitted.values()))
            if refusal is None:
                self._admitted[key] = address
            return refusal

    def release(self, key: Hashable) -> None:
        with self._lock:
            self._admitted.pop(key, None)

    def __len__(self) -> int:
        """Associations open now."""
        with self._lock:
            return len(self._admitted)

    def release_where(self, belongs: Callable[[Hashable], bool]) -> int:
        """Forget every key `belongs` says yes to (a receive worker's, when it ended); how many."""
        with self._lock:
            gone = [key for key in self._admitted if belongs(key)]
            for key in gone:
                del self._admitted[key]
            return len(gone)


class FloodLog:
    """The lines about refused and timed-out connections: one per address and reason per interval.

    One per node, like the admissions: with receive workers the coordinator's, which the
    workers tell (scp.receive.worker), so an address flooding every worker still gets one line."""

    def __init__(self, request_timeout: float, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.request_timeout = request_timeout
        self.rate = RateLimitedLog(interval, clock)

    def refused(self, address: str, reason: str) -> None:
        """An association from `address` refused at the limits (`reason` says which)."""
        count = self.rate.note(("limit", address))
        if count is not None:
            log.warning("%d association(s) from %s refused (A-ASSOCIATE-RJ transient, local limit exceeded): "
                        "%s; further refusals for this address are counted into one line every %g s", count,
                        address, reason, self.rate.interval, extra={"peer": address})

    def timed_out(self, address: str) -> None:
        """A connection from `address` closed without a complete A-ASSOCIATE-RQ in time."""
        count = self.rate.note(("request", address))
        if count is not None:
            log.warning("%d connection(s) from %s closed: no complete A-ASSOCIATE-RQ within %g s "
                        "(node.request_timeout); further ones from this address are counted into one line "
                        "every %g s", count, address, self.request_timeout, self.rate.interval,
                        extra={"peer": address})

    def flush(self) -> None:
        """At stop: the counts not yet in a line."""
        for (reason, address), count in sorted(self.rate.pending().items()):
            what = ("connection(s) closed without a complete A-ASSOCIATE-RQ" if reason == "request"
                    else "association(s) refused at the connection limits")
            log.warning("%d more %s from %s since the last line", count, what, address, extra={"peer": address})


class FloodReporter(Protocol):
    def refused(self, address: str, reason: str) -> None: ...

    def timed_out(self, address: str) -> None: ...

    def flush(self) -> None: ...


class AdmissionTable(Protocol):
    def admit(self, key: Hashable, address: str) -> Refusal | None: ...

    def release(self, key: Hashable) -> None: ...


class ConnectionLimits:
    """The limits and the request timeout on the server's events (bound in scp.receive.server).

    connected (EVT_CONN_OPEN), admit (EVT_REQUESTED, after the access policy), closed
    (EVT_CONN_CLOSE). Thread-safe: every connection has its own threads.
    """

    def __init__(self, node: NodeConfig, *, clock: Callable[[], float] = time.monotonic,
                 log_interval: float = LOG_INTERVAL, admissions: AdmissionTable | None = None,
                 flood_log: FloodReporter | None = None) -> None:
        """admissions, flood_log: the node's when they are not this process's (a receive worker's)."""
        self.limits = Limits.from_config(node)
        self.admissions = admissions if admissions is not None else Admissions(self.limits)
        self.request_timeout = node.request_timeout
        self.network_timeout = node.network_timeout
        self.acse_timeout = node.acse_timeout
        self.clock = clock
        self.flood_log = flood_log if flood_log is not None else FloodLog(node.request_timeout, log_interval, clock)
        self._opened: dict[int, tuple[object, float]] = {}  # id(assoc) -> (assoc, when its connection opened)
        self._admitted: dict[int, object] = {}  # id(assoc) -> assoc, while admitted
        self._lock = threading.Lock()

    def connected(self, event) -> None:
        """EVT_CONN_OPEN: the request's deadline starts; every read gets a timeout."""
        with self._lock:
            # pynetdicom skips EVT_CONN_CLOSE when its acceptor gives up on a request first: forget
            # connections whose threads ended.
            for key in [k for k, (a, _) in self._opened.items() if a.ident is not None and not a.is_alive()]:
                del self._opened[key]
            self._opened[id(event.assoc)] = (event.assoc, self.clock())
        transport.guard_connection(event, self.request_timeout, self.network_timeout, self.request_timed_out)

    def admit(self, assoc) -> Refusal | None:
        """EVT_REQUESTED: the ACSE timeout replaces the request's; None when the association fits
        (it then counts until its connection closes), else the refusal (logged here, rate-limited)."""
        transport.association_requested(assoc, self.acse_timeout)
        address = transport.requestor_address(assoc)
        with self._lock:
            # A thread that ended without EVT_CONN_CLOSE must not count forever.
            ended = [k for k, a in self._admitted.items() if not a.is_alive()]
            for key in ended:
                del self._admitted[key]
        for key in ended:
            self.admissions.release(key)
        refusal = self.admissions.admit(id(assoc), address)
        if refusal is None:
            with self._lock:
                self._admitted[id(assoc)] = assoc
            return None
        self.flood_log.refused(address, refusal[1])
        return refusal

    def closed(self, event) -> None:
        """EVT_CONN_CLOSE: the association no longer counts; a connection that never completed
        its A-ASSOCIATE-RQ within request_timeout is logged (rate-limited per address)."""
        assoc = event.assoc
        with self._lock:
            opened = self._opened.pop(id(assoc), (None, None))[1]
            admitted = self._admitted.pop(id(assoc), None) is not None
        if admitted:
            self.admissions.release(id(assoc))
        if opened is None or transport.is_requested(assoc) or transport.stalled_before_request(assoc):
            return  # a stalled request was counted when its read gave up
        if self.clock() - opened < self.request_timeout * TIMER_SLACK:
            return  # closed early by the peer or for bad bytes: scp.receive.handlers says so
        self.request_timed_out(transport.requestor_address(assoc))

    def request_timed_out(self, address: str) -> None:
        """A connection from `address` closed without a complete A-ASSOCIATE-RQ in time."""
        self.flood_log.timed_out(address)

    def flush(self) -> None:
        """At stop: the counts not yet in a line."""
        self.flood_log.flush()
