"""A receive worker: one process of node.workers, running the AE on the node's port.

Started by the coordinator (scp.receive.pool) as ``python -m scp.receive.worker EVENTS HANDOVER``
with two inherited AF_UNIX sockets: EVENTS carries the messages below, HANDOVER (-1 with
node.worker_sockets = "reuseport") the connections the coordinator accepted.

It spools exactly as the single-process node does (fsync before success). The coordinator
owns completion and delivery; the worker tells it, as one JSON array per line on EVENTS:

    worker → coordinator                           coordinator → worker
    ["ready"]             listening                 (first) 4-byte length + pickled Start
    ["a", study, sop]     an instance is spooled    ["adm", key, refusal or null]
                          (before its success)      ["stop", grace]
    ["s", aet, ok, secs]  one C-STORE handled (metrics)
    ["c", aet]            an association accepted (metrics)
    ["adm", key, addr]    may this association count? (the node's connection limits)
    ["rel", key]          it no longer counts
    ["x"]                 a connection closed (the hand-over's balance)
    ["fl", kind, addr, why]  a refused ("limit") or timed-out ("request") connection, for the
                          node's rate-limited log line

An arrival is written before the instance's success goes back, so the coordinator reads
every acknowledged instance even when the worker is killed right after (the kernel keeps
what was written). When EVENTS closes (the coordinator is gone) the worker exits at once, as
the node would have had it been one process: what it acknowledged is in the spool, and the
next node start resumes it; what was in flight was not acknowledged, and is sent again.
"""

from __future__ import annotations

import copyreg
import io
import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import threading
from collections.abc import Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from scp import logs
from scp.config import Config
from scp.receive.limits import Refusal
from scp.receive.server import StorageServer, receiver
from scp.receive.status import REJECT_LIMIT
from scp.store.spool import FileSpool

log = logging.getLogger("scp.receive.worker")

ADMIT_TIMEOUT = 5.0  # s an association waits for the coordinator's yes or no; then refused (transient)
LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class Start:
    """What a worker is told first: its configuration (the port already bound), which one it is,
    how the node logs."""

    config: Config
    index: int
    log_settings: dict[str, Any]


def send_start(sock: socket.socket, start: Start) -> None:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    # The configuration's read-only tables (MappingProxyType) travel as what they wrap.
    pickler.dispatch_table = {**copyreg.dispatch_table, MappingProxyType: _reduce_proxy}
    pickler.dump(start)
    data = buffer.getvalue()
    sock.sendall(LENGTH.pack(len(data)) + data)


def _reduce_proxy(proxy: MappingProxyType) -> tuple:
    return _read_only, (dict(proxy),)


def _read_only(table: dict) -> MappingProxyType:
    return MappingProxyType(table)


def _read_start(stream) -> Start:
    size = LENGTH.unpack(_read_exactly(stream, LENGTH.size))[0]
    return pickle.loads(_read_exactly(stream, size))


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError("the coordinator closed the channel before the worker's start message")
    return data


def encode(*fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


class Channel:
    """The worker's end of EVENTS: thread-safe sends; a broken channel is said once, then sends
    do nothing (the coordinator is gone; the worker is stopping because of it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self.broken = False

    def send(self, *fields: Any) -> None:
        data = encode(*fields)
        with self._lock:
            if self.broken:
                return
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.broken = True
                log.warning("receive worker: the coordinator's channel is closed (%s); stopping", exc)


class _ForwardedCounter:
    def __init__(self, channel: Channel, aet: str) -> None:
        self.channel = channel
        self.aet = aet

    def inc(self, n: int = 1) -> None:
        self.channel.send("c", self.aet)


class _ForwardedSender:
    """What the C-STORE handler uses of scp.ops.metrics.SenderMetrics, told to the coordinator."""

    def __init__(self, channel: Channel, aet: str) -> None:
        self.channel = channel
        self.aet = aet
        self.associations = _ForwardedCounter(channel, aet)

    def stored(self, ok: bool, seconds: float) -> None:
        self.channel.send("s", self.aet, 1 if ok else 0, round(seconds, 6))


class ForwardedMetrics:
    """The handler's metrics, counted by the coordinator (its ops endpoint serves them)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def for_sender(self, calling_aet: str) -> _ForwardedSender:
        return _ForwardedSender(self.channel, calling_aet)


class ForwardedFloodLog:
    """The connection floods, logged by the coordinator (one line per address for the node)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def refused(self, address: str, reason: str) -> None:
        self.channel.send("fl", "limit", address, reason)

    def timed_out(self, address: str) -> None:
        self.channel.send("fl", "request", address, "")

    def flush(self) -> None:
        pass  # the coordinator's, at its stop


class RemoteAdmissions:
    """The node's connection limits, asked of the coordinator (scp.receive.limits.Admissions there)."""

    def __init__(self, channel: Channel, timeout: float = ADMIT_TIMEOUT) -> None:
        self.channel = channel
        self.timeout = timeout
        self._waiting: dict[Hashable, Future] = {}
        self._lock = threading.Lock()

    def admit(self, key: Hashable, address: str) -> Refusal | None:
        answer: Future = Future()
        with self._lock:
            self._waiting[key] = answer
        self.channel.send("adm", key, address)
        try:
            refusal = answer.result(self.timeout)
        except FutureTimeout:
            return REJECT_LIMIT, f"the node's coordinator did not answer within {self.timeout:g} s"
        finally:
            with self._lock:
                self._waiting.pop(key, None)
        if refusal is None:
            return None
        return tuple(refusal[0]), refusal[1]

    def answered(self, key: Hashable, refusal: Any) -> None:
        with self._lock:
            answer = self._waiting.get(key)
        if answer is not None and not answer.done():
            answer.set_result(refusal)

    def release(self, key: Hashable) -> None:
        self.channel.send("rel", key)


def build(start: Start, channel: Channel, admissions: RemoteAdmissions,
          handed_over: socket.socket | None) -> StorageServer:
    config = start.config
    node = config.node
    spool = FileSpool(node.spool_dir)
    archive = FileSpool(node.archive_dir) if node.archive_dir is not None else None
    return receiver(config, spool, lambda study, sop: channel.send("a", study, sop), archive=archive,
                    metrics=ForwardedMetrics(channel), reuse_port=handed_over is None, handed_over=handed_over,
                    admissions=admissions, flood_log=ForwardedFloodLog(channel),
                    on_closed=lambda _event: channel.send("x"))


def _listen_to_coordinator(stream, admissions: RemoteAdmissions, stop: threading.Event,
                           grace: list[float]) -> None:
    """The coordinator's answers and its stop; EOF (it is gone) stops the worker too."""
    try:
        for line in stream:
            message = json.loads(line)
            if message[0] == "adm":
                admissions.answered(message[1], message[2])
            elif message[0] == "stop":
                grace[0] = float(message[1])
                stop.set()
                return
    except (OSError, ValueError) as exc:
        log.warning("receive worker (pid %d): unreadable message from the coordinator (%s)", os.getpid(), exc)
    if not stop.is_set():
        log.warning("receive worker (pid %d): the node's coordinator is gone; exiting at once (what was "
                    "acknowledged is in the spool for the next start)", os.getpid())
        logging.shutdown()
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    events = socket.socket(fileno=int(argv[0]))
    handed_over = socket.socket(fileno=int(argv[1])) if int(argv[1]) >= 0 else None
    stream = events.makefile("rb")
    start = _read_start(stream)
    logs.apply(start.log_settings, worker=start.index)
    # Ctrl-C reaches the whole process group, systemd's SIGTERM the whole cgroup: a worker stops
    # when its coordinator says so (or is gone), never on its own, so that a worker that stopped
    # first is not mistaken for one that died (and started again) while the node stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop = threading.Event()
    grace = [start.config.node.stop_grace]
    channel = Channel(events)
    admissions = RemoteAdmissions(channel)
    server = build(start, channel, admissions, handed_over)
    threading.Thread(target=_listen_to_coordinator, args=(stream, admissions, stop, grace),
                     name="coordinator", daemon=True).start()
    server.start()
    channel.send("ready")
    log.debug("receive worker %d (pid %d) ready", start.index, os.getpid())
    stop.wait()
    server.stop(grace[0])
    logging.shutdown()
    os._exit(0)  # threads of pynetdicom's are left to the kernel: the stop closed their connections


def worker_config(config: Config, port: int) -> Config:
    """The configuration a worker gets: the port the coordinator bound (node.port may be 0)."""
    return replace(config, node=replace(config.node, port=port))


if __name__ == "__main__":
    sys.exit(main())
