"""What the node did since it started, as Prometheus metrics (exported by scp.ops.http).

Each Metrics owns its own CollectorRegistry, never prometheus_client's global one: the
tests start several nodes in one process, and each must count only its own work.

- counters: COUNTERS (exported as dicom_fhir_scp_<name>_total); those in SENDER_COUNTERS
  carry a ``calling_aet`` label (who sent the instances; for a delivery, the study's sender —
  the first by AE title when several sent parts of it, "?" before its headers were read).
  studies_completed has none: a study completes on its idle timer, before its senders are read;
- histograms: HISTOGRAMS (C-STORE handling time, completion → delivered);
- gauges read at scrape time: GAUGES, through the callables given to ``watch`` (they
  read the disk, so they run only when Prometheus asks, never on the C-STORE path);
- the process and platform collectors prometheus_client provides (memory, CPU, open
  files, Python version, garbage collection).

The association handler takes a ``SenderMetrics`` once per association (``for_sender``),
so that the C-STORE hot path does no label lookup. prometheus_client's metrics are
thread-safe; ``snapshot()`` sums the counters over their labels (for tests and `status`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, \
    ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("scp.ops.metrics")

PREFIX = "dicom_fhir_scp_"

COUNTERS: dict[str, str] = {
    "instances_received": "Instances stored in the spool and acknowledged with success.",
    "instances_failed": "Instances answered with a failure status.",
    "associations": "Associations accepted.",
    "studies_completed": "Studies that reached the idle timeout and were handed to delivery.",
    "deliveries_ok": "Study deliveries that succeeded on every sink.",
    "deliveries_failed": "Study delivery attempts that failed (retried later or dead-lettered).",
}
SENDER_COUNTERS = frozenset({"instances_received", "instances_failed", "associations", "deliveries_ok",
                             "deliveries_failed"})
SENDER_LABEL = "calling_aet"

HISTOGRAMS: dict[str, str] = {
    "instance_store_seconds": "Time to handle one C-STORE (parse, spool, answer), in seconds.",
    "study_delivery_seconds": "Time from a study's completion to its delivery to every sink, in seconds.",
}
# C-STORE: header-only spooling takes milliseconds; the tail is a slow disk's fsync.
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Delivery: seconds for the disk, minutes when a FHIR server needs retries.
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

GAUGES: dict[str, str] = {
    "spool_studies": "Studies waiting in the spool (received, not yet delivered).",
    "spool_bytes": "Bytes of instance headers waiting in the spool.",
    "dead_letter_studies": "Studies set aside in the dead-letter folder (need a person).",
}

UNKNOWN_SENDER = "?"


@dataclass(frozen=True)
class SenderMetrics:
    """The counters of one calling AE title, bound once (per association)."""

    received: Counter
    failed: Counter
    associations: Counter
    store_seconds: Histogram

    def stored(self, ok: bool, seconds: float) -> None:
        """One C-STORE handled: counted as received (ok) or failed, and timed."""
        (self.received if ok else self.failed).inc()
        self.store_seconds.observe(seconds)


class _ScrapeGauges(Collector):
    """The GAUGES whose callables were given to Metrics.watch, called at each scrape.

    A callable that raises makes the scrape fail (scp.ops.http answers 500): a gauge
    that cannot be read must not look like a zero.
    """

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], float]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, read in list(self.sources.items()):
            try:
                value = read()
            except Exception as exc:
                raise RuntimeError(f"cannot read the gauge {PREFIX}{name}: {exc}") from exc
            yield GaugeMetricFamily(PREFIX + name, GAUGES[name], value=float(value))


class Metrics:
    """The node's metrics in their own registry (``registry``, served by scp.ops.http)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = {
            name: Counter(PREFIX + name, help_text, [SENDER_LABEL] if name in SENDER_COUNTERS else [],
                          registry=self.registry)
            for name, help_text in COUNTERS.items()
        }
        self.store_seconds = Histogram(PREFIX + "instance_store_seconds", HISTOGRAMS["instance_store_seconds"],
                                       [SENDER_LABEL], buckets=STORE_BUCKETS, registry=self.registry)
        self.delivery_seconds = Histogram(PREFIX + "study_delivery_seconds", HISTOGRAMS["study_delivery_seconds"],
                                          buckets=DELIVERY_BUCKETS, registry=self.registry)
        self._gauges = _ScrapeGauges()
        self.registry.register(self._gauges)
        # Free with prometheus_client: process_* (memory, CPU, fds), python_info, python_gc_*.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def inc(self, name: str, n: int = 1, *, calling_aet: str | None = None) -> None:
        """Add n to a counter; those in SENDER_COUNTERS need the sender's calling AE title."""
        counter = self._counters.get(name)
        if counter is None:
            raise ValueError(f"name: unknown counter {name!r}; known: {sorted(COUNTERS)}")
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n: expected an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n: counters only go up, got {n}")
        if name in SENDER_COUNTERS:
            counter.labels(calling_aet or UNKNOWN_SENDER).inc(n)
        elif calling_aet is not None:
            raise ValueError(f"calling_aet: the counter {name!r} has no sender label")
        else:
            counter.inc(n)

    def for_sender(self, calling_aet: str) -> SenderMetrics:
        """The per-sender counters, looked up once (the C-STORE path then only increments)."""
        aet = calling_aet or UNKNOWN_SENDER
        return SenderMetrics(self._counters["instances_received"].labels(aet),
                             self._counters["instances_failed"].labels(aet),
                             self._counters["associations"].labels(aet),
                             self.store_seconds.labels(aet))

    def delivered(self, seconds: float, calling_aet: str | None = None) -> None:
        """A study (sent by calling_aet) delivered to every sink, `seconds` after its completion."""
        self._counters["deliveries_ok"].labels(calling_aet or UNKNOWN_SENDER).inc()
        self.delivery_seconds.observe(seconds)

    def watch(self, name: str, read: Callable[[], float]) -> None:
        """Export GAUGES[name] as read() at each scrape (replaces an earlier callable)."""
        if name not in GAUGES:
            raise ValueError(f"name: unknown gauge {name!r}; known: {sorted(GAUGES)}")
        self._gauges.sources[name] = read

    def snapshot(self) -> dict[str, int]:
        """Every counter's total over its labels (a copy)."""
        return {name: int(sum(sample.value for family in counter.collect() for sample in family.samples
                              if sample.name.endswith("_total")))
                for name, counter in self._counters.items()}
