"""The node assembled: server → spool → completion timer → delivery worker → sinks.

With node.workers > 1 the server is a pool of receive processes (scp.receive.pool) feeding
this one, which keeps completion and delivery.

    node = Node(config)            # sinks from the config: disk (node.output_dir), FHIR ([fhir] url)
    host, port = node.start()      # resumes studies found in the spool
    ...
    node.stop()                    # stop listening, finish the instance in flight, keep the spool

With [hooks] on_delivered, the end-of-study hook runs after each delivered study, on a
thread of its own (scp.pipeline.hooks).

Everything a test wants to replace is a parameter: the sinks, the clock, the metrics,
the completion callback. ``node.readiness`` holds the /readyz checks (scp.ops.readiness)
built from what the node owns; the disk gauges are handed to the metrics here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from scp.config import Config
from scp.ops.metrics import Metrics
from scp.ops.readiness import Check, DestinationCheck, Readiness, listening_check, spool_check
from scp.pipeline.completion import CompletionTracker
from scp.pipeline.delivery import DeliveryReport, Route
from scp.pipeline.hooks import BackgroundHooks, delivered_from_report, hook_runner
from scp.pipeline.retry import RetryPolicy
from scp.pipeline.worker import DeliveryWorker
from scp.receive.handlers import recover_incoming
from scp.receive.pool import ReceivePool
from scp.receive.server import StorageServer, incoming_folder, receiver
from scp.senders import SenderTable
from scp.sinks import Sink
from scp.store.dead_letter import DeadLetterBox
from scp.store.journal import Journal
from scp.store.spool import FileSpool

log = logging.getLogger("scp.node")

STOP_MOMENT = 0.5  # s the delivery and hooks get at a stop even when the server used all the grace
PROBE_TIMEOUT = 3.0  # seconds a /readyz probe of a FHIR server may take (scrapers time out at ~10 s)


def default_sinks(config: Config) -> list[Sink]:
    """One sink per destination, named as Config.destination_names() names them: "disk" when
    node.output_dir is set, "fhir" when [fhir] url is set, then each [fhir.destinations.NAME]."""
    sinks: list[Sink] = []
    if config.node.output_dir is not None:
        from scp.sinks.disk import DiskSink
        sinks.append(DiskSink(config.node.output_dir, config.node.shape))
    if config.fhir.url or config.destinations:
        from scp.sinks.fhir.sink import FhirSink
        if config.fhir.url:
            sinks.append(FhirSink(config.fhir, config.mapping))
        for name, fhir in config.destinations.items():
            sinks.append(FhirSink(fhir, config.mapping, name=name))
    return sinks


def study_route(config: Config) -> Route | None:
    """Where a study goes by its senders ([[senders]] destinations); None without [[senders]]:
    every sink, as before (also sinks a caller gives that are no configured destination)."""
    if not config.senders:
        return None
    return SenderTable.from_config(config).destinations_for


class Node:
    def __init__(self, config: Config, *, sinks: Sequence[Sink] | None = None,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None,
                 on_complete: Callable[[str, frozenset[str]], None] | None = None) -> None:
        self.config = config
        node = config.node
        runner = hook_runner(config.hooks)  # ConfigurationError now, before any folder is made, not at the first study
        self.hooks = BackgroundHooks(runner, config.hooks.max_pending) if runner is not None else None
        self.metrics = metrics
        self.spool = FileSpool(node.spool_dir)
        self.archive = FileSpool(node.archive_dir) if node.archive_dir is not None else None
        self.dead_letters = DeadLetterBox(node.dead_letter_dir)
        self.sinks = list(default_sinks(config) if sinks is None else sinks)
        self.tracker = CompletionTracker(node.idle_timeout, on_complete or self._completed, clock=clock)
        # Each study mapped with its senders' options (scp.senders: [[senders]], else [mapping] for all).
        self.delivery = DeliveryWorker(self.spool, self.sinks, senders=SenderTable.from_config(config),
                                       dead_letters=self.dead_letters,
                                       journal=Journal.in_spool(node.spool_dir, max_bytes=node.journal_max_bytes),
                                       retry=RetryPolicy(max_backoff=config.fhir.max_backoff), clock=clock,
                                       metrics=metrics,
                                       on_delivered=self._delivered if self.hooks is not None else None,
                                       route=study_route(config), workers=node.delivery_workers,
                                       parse_while_receiving=self._spare_core if node.workers > 1 else None)
        # node.workers > 1: receive workers (scp.receive.pool) tell this process what they spooled.
        self.server: StorageServer | ReceivePool
        if node.workers > 1:
            self.server = ReceivePool(config, self._arrived, metrics=metrics, clock=clock)
        else:
            self.server = receiver(config, self.spool, self._arrived, archive=self.archive, metrics=metrics)
        self.readiness = Readiness(self._readiness_checks(clock))
        if metrics is not None:  # read at scrape time, never on the C-STORE path
            metrics.watch("spool_studies", self.spool.depth)
            metrics.watch("spool_bytes", self.spool.size_bytes)
            metrics.watch("dead_letter_studies", self.dead_letters.count)

    def _readiness_checks(self, clock: Callable[[], float]) -> dict[str, Check]:
        ops = self.config.operations
        checks: dict[str, Check] = {
            "listening": listening_check(lambda: self.server.is_listening),
            "spool": spool_check(self.config.node.spool_dir, ops.min_free_bytes),
        }
        from scp.sinks.fhir.client import FhirClient
        for sink in self.sinks:
            client = getattr(sink, "client", None)
            if not isinstance(client, FhirClient):
                continue
            # Its own client (a short timeout), sharing the sink's credentials and token cache; the
            # destination's own settings (TLS, timeout), [fhir]'s for a sink built without them.
            fhir = getattr(sink, "fhir", None) or self.config.fhir
            probe_client = FhirClient(replace(fhir, url=client.base, timeout=min(PROBE_TIMEOUT, fhir.timeout),
                                              request_deadline=min(PROBE_TIMEOUT, fhir.request_deadline)),
                                      auth=client.auth, name=sink.name)
            checks[sink.name] = DestinationCheck(
                lambda c=probe_client: c.request("GET", "metadata", expect=(200,)),
                lambda name=sink.name: self.delivery.last_delivered.get(name),
                window=ops.ready_window, where=f"GET {probe_client.shown_base}/metadata", clock=clock)
        return checks

    def _arrived(self, study_uid: str, sop_uid: str) -> None:
        """An instance is in the spool: its study's idle timer restarts; it may be parsed ahead."""
        self.tracker.arrived(study_uid, sop_uid)
        self.delivery.arrived(study_uid, sop_uid)

    def _completed(self, study_uid: str, sop_uids: frozenset[str]) -> None:
        log.debug("study %s complete: %d instance(s) received since its last completion; delivering",
                 study_uid, len(sop_uids))
        if self.metrics is not None:
            self.metrics.inc("studies_completed")
        self.delivery.submit(study_uid, sop_uids)

    def _delivered(self, report: DeliveryReport) -> None:
        """Queue the end-of-study hook (called on the delivery thread: must not wait for the hook)."""
        self.hooks.submit(delivered_from_report(report, self.config.node.output_dir))

    def check_fhir_servers(self) -> None:
        """Each FHIR sink's server speaks fhir.version (GET metadata), before the node listens:
        ConfigurationError naming both versions when one does not; one that cannot be reached
        is checked again before its first delivery (scp.sinks.fhir.sink)."""
        for sink in self.sinks:
            check = getattr(sink, "check_server_version", None)
            if check is not None:
                check()

    def _spare_core(self) -> bool:
        """Whether the receive workers leave a core for parsing headers ahead while instances arrive:
        at most one association open (one association keeps about one core busy)."""
        server = getattr(self, "server", None)
        return isinstance(server, ReceivePool) and len(server.admissions) <= 1

    def start(self) -> tuple[str, int]:
        self.spool.recover()
        recover_incoming(incoming_folder(self.config.node))  # before anything receives
        waiting = self.spool.studies()
        if waiting:
            log.info("resuming %d study(ies) found in the spool (%d instance(s)); they complete in %g s",
                     len(waiting), sum(map(len, waiting.values())), self.config.node.idle_timeout)
        self.tracker.resume(waiting)  # each completes idle_timeout from now
        for study_uid, sop_uids in waiting.items():
            for sop_uid in sop_uids:
                self.delivery.arrived(study_uid, sop_uid)
        if self.hooks is not None:
            self.hooks.start()
        self.delivery.start()
        self.tracker.start()
        where = self.server.start()
        names = ", ".join(s.name for s in self.sinks) or "none"
        # Not "ready": the command says that once every listener (this one, the ops endpoint) is up.
        log.info("node %s started: spool %s, idle timeout %g s, sinks: %s", self.config.node.ae_title,
                 self.config.node.spool_dir, self.config.node.idle_timeout, names)
        return where

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, grace: float | None = None) -> None:
        """Graceful: no new associations, the instance in flight finishes, the spool is kept.

        Everything together takes about `grace` seconds (node.stop_grace) at most: the server
        gets it first, the delivery and the hooks what is left of it (at least a moment each)."""
        grace = self.config.node.stop_grace if grace is None else grace
        deadline = time.monotonic() + grace
        self.server.stop(grace)
        self.tracker.stop()
        self.delivery.stop(timeout=max(deadline - time.monotonic(), STOP_MOMENT))
        if self.hooks is not None:
            self.hooks.stop(timeout=max(deadline - time.monotonic(), STOP_MOMENT))
        waiting = self.spool.depth()
        log.info("stopped; %d study(ies) wait in the spool %s", waiting, self.config.node.spool_dir)
