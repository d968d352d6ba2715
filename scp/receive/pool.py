"""Receive in several processes (node.workers > 1): the coordinator's side.

The node's process (the coordinator) starts node.workers receive workers (scp.receive.worker),
each running the AE on the node's port, and keeps completion and delivery to itself: the
workers tell it every spooled instance (`on_arrived`), their metrics, and ask it whether an
association fits the node's connection limits (one table for the node, here).

How the workers share the port (node.worker_sockets):

- "reuseport": each worker listens on its own socket with SO_REUSEPORT; the kernel spreads
  the connections over them by a hash of the peer's address and port. The coordinator holds
  one more socket bound to the port, never listening, so the port stays the node's while a
  worker restarts (and port 0 is chosen once).
- "handover": the coordinator listens and accepts, and passes each connection (SCM_RIGHTS)
  to the worker with the fewest open connections.

A worker that ends unexpectedly is logged and started again (after a pause that grows while
it keeps failing at once). Everything it acknowledged was spooled and its arrival written
before the success went back: the coordinator reads those lines even after the worker died.
If the coordinator dies, the workers see their channel close and stop; the next start
resumes the spool.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from scp import logs
from scp.config import Config
from scp.ops.metrics import Metrics
from scp.receive import transport, worker as worker_process
from scp.receive.dataset import clear_incoming
from scp.receive.limits import Admissions, FloodLog, Limits
from scp.receive.server import incoming_folder

log = logging.getLogger("scp.receive.pool")

READY_TIMEOUT = 60.0  # s a worker may take to start listening (imports, TLS files)
KILL_WAIT = 3.0  # s after the stop's grace before a worker that did not stop is killed
RESTART_PAUSE = 0.5  # s before a worker that ended is started again; doubled while it fails fast
MAX_RESTART_PAUSE = 30.0
FAILS_FAST = 5.0  # s: a worker that ended sooner after its start counts as failing at once
BACKLOG = transport.LISTEN_BACKLOG

OnArrived = Callable[[str, str], None]


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    events: socket.socket
    handover: socket.socket | None
    started: float
    ready: threading.Event = field(default_factory=threading.Event)
    open_connections: int = 0
    reader: threading.Thread | None = None


class ReceivePool:
    """node.workers receive processes on one port; `start()` returns the bound (address, port)."""

    def __init__(self, config: Config, on_arrived: OnArrived, *, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.count = config.node.workers
        self.mode = config.node.worker_sockets
        self.on_arrived = on_arrived
        self.metrics = metrics
        self.clock = clock
        self.admissions = Admissions(Limits.from_config(config.node))
        self.flood_log = FloodLog(config.node.request_timeout, clock=clock)
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._socket: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._pause = [RESTART_PAUSE] * self.count
        self._threads: list[threading.Thread] = []

    # --- start ----------------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Bind the port, start every worker, return once each is listening. OSError when the
        port cannot be had; RuntimeError when a worker does not start (its log says why)."""
        self._socket = self._bind()
        host, port = self._socket.getsockname()[:2]
        self._address = (self.config.node.bind, port)
        try:
            for index in range(self.count):
                self._spawn(index)
            deadline = self.clock() + READY_TIMEOUT
            for index in range(self.count):
                self._wait_ready(index, deadline)
        except BaseException:
            self.stop(0)
            raise
        if self.mode == "handover":
            self._thread(self._accept, "handover")
        self._thread(self._watch, "workers")
        log.info("listening on %s:%d as %s with %d receive workers (%s), pids %s", host or "*", port,
                 self.config.node.ae_title, self.count, self.mode, " ".join(map(str, self.pids)))
        return host, port

    def _bind(self) -> socket.socket:
        node = self.config.node
        family = socket.AF_INET6 if ":" in node.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.mode == "reuseport":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((node.bind, node.port))
            if self.mode == "handover":
                sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    def _thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _spawn(self, index: int) -> _Worker:
        assert self._address is not None
        ours, theirs = socket.socketpair()
        handover = handover_theirs = None
        if self.mode == "handover":
            handover, handover_theirs = socket.socketpair()
        passed = [theirs.fileno()] + ([handover_theirs.fileno()] if handover_theirs is not None else [])
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "scp.receive.worker", str(theirs.fileno()),
                 str(handover_theirs.fileno() if handover_theirs is not None else -1)],
                pass_fds=passed, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
            if handover_theirs is not None:
                handover_theirs.close()
        start = worker_process.Start(worker_process.worker_config(self.config, self._address[1]), index,
                                     logs.settings())
        worker = _Worker(index, process, ours, handover, self.clock())
        with self._lock:
            self._workers[index] = worker
        try:
            worker_process.send_start(ours, start)
        except OSError as exc:  # it died at once; the watcher says so and starts another
            log.debug("receive worker %d: start message not sent: %s", index, exc)
        worker.reader = threading.Thread(target=self._read, args=(worker,), name=f"worker-{index}-events",
                                         daemon=True)
        worker.reader.start()
        return worker

    def _wait_ready(self, index: int, deadline: float) -> None:
        worker = self._workers[index]
        while not worker.ready.wait(0.1):
            code = worker.process.poll()
            if code is not None:
                raise RuntimeError(f"receive worker {index} ended at its start ({_how_ended(code)}); "
                                   f"its log lines above say why")
            if self.clock() > deadline:
                raise RuntimeError(f"receive worker {index} did not start listening within {READY_TIMEOUT:g} s")

    # --- what the workers say -------------------------------------------------------------------

    def _read(self, worker: _Worker) -> None:
        """Every line a worker wrote, until its channel closes (after it ended: nothing is left unread)."""
        stream = worker.events.makefile("rb")
        try:
            for line in stream:
                try:
                    self._handle(worker, json.loads(line))
                except Exception:  # a bad line must not stop the arrivals after it
                    log.exception("receive worker %d: message %r not handled", worker.index, line[:200])
        except OSError:
            pass
        finally:
            stream.close()

    def _handle(self, worker: _Worker, message: list) -> None:
        kind = message[0]
        if kind == "a":
            self.on_arrived(message[1], message[2])
        elif kind == "s":
            if self.metrics is not None:
                self.metrics.for_sender(message[1]).stored(bool(message[2]), float(message[3]))
        elif kind == "adm":
            refusal = self.admissions.admit((worker.index, message[1]), message[2])
            self._tell(worker, "adm", message[1], refusal)
        elif kind == "rel":
            self.admissions.release((worker.index, message[1]))
        elif kind == "x":
            with self._lock:
                worker.open_connections = max(worker.open_connections - 1, 0)
        elif kind == "c":
            if self.metrics is not None:
                self.metrics.for_sender(message[1]).associations.inc()
        elif kind == "fl":
            if message[1] == "limit":
                self.flood_log.refused(message[2], message[3])
            else:
                self.flood_log.timed_out(message[2])
        elif kind == "ready":
            worker.ready.set()
        else:
            log.warning("receive worker %d: unknown message %r", worker.index, kind)

    def _tell(self, worker: _Worker, *fields) -> None:
        try:
            worker.events.sendall(worker_process.encode(*fields))
        except OSError:
            pass  # it ended; the watcher restarts it

    # --- the hand-over --------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._socket is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._socket.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: the connection waits in the backlog
                continue
            try:
                self._hand_over(conn)
            finally:
                conn.close()

    def _hand_over(self, conn: socket.socket) -> None:
        with self._lock:
            ready = sorted((w for w in self._workers.values()
                            if w.ready.is_set() and w.process.poll() is None and w.handover is not None),
                           key=lambda w: w.open_connections)
        for worker in ready:
            try:
                transport.pass_connection(worker.handover, conn)
            except OSError:
                continue  # ending: the next one
            with self._lock:
                worker.open_connections += 1
            return
        log.warning("a connection was closed unanswered: no receive worker is running (restarting)")

    # --- restarts -------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                ended = [w for w in self._workers.values() if w.process.poll() is not None]
            for worker in ended:
                if self._stopping.is_set():
                    return
                self._restart(worker)
            self._stopping.wait(0.1)

    def _restart(self, worker: _Worker) -> None:
        """Start another in its place (its last arrivals read first), unless the node is stopping."""
        code = worker.process.returncode
        lived = self.clock() - worker.started
        if worker.reader is not None:
            worker.reader.join(5)  # its last arrivals first
        worker.events.close()
        if worker.handover is not None:
            worker.handover.close()
        released = self.admissions.release_where(lambda key: key[0] == worker.index)
        left = clear_incoming(incoming_folder(self.config.node), worker.process.pid)  # never acknowledged
        index = worker.index
        pause = self._pause[index] if lived < FAILS_FAST else RESTART_PAUSE
        self._pause[index] = min(pause * 2, MAX_RESTART_PAUSE)
        log.warning("receive worker %d (pid %d) ended unexpectedly (%s) with %d association(s) open; starting "
                    "another in %g s (what it acknowledged is in the spool%s)", index, worker.process.pid,
                    _how_ended(code), released, pause,
                    f"; {left} data set(s) it was receiving removed" if left else "")
        if self._stopping.wait(pause):
            with self._lock:
                self._workers.pop(index, None)
            return
        replacement = self._spawn(index)
        if replacement.ready.wait(READY_TIMEOUT) and not self._stopping.is_set():
            log.info("receive worker %d started again (pid %d)", index, replacement.process.pid)

    # --- stop -----------------------------------------------------------------------------------

    @property
    def is_listening(self) -> bool:
        """Started, not stopped, and some worker listening."""
        if self._socket is None or self._stopping.is_set():
            return False
        with self._lock:
            return any(w.ready.is_set() and w.process.poll() is None for w in self._workers.values())

    @property
    def port(self) -> int:
        assert self._address is not None
        return self._address[1]

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers.values()]

    def stop(self, grace: float | None = None) -> None:
        """Every worker stops as the single-process node does (no new associations, the instance
        in flight may finish within `grace`); one still running after that is killed."""
        grace = self.config.node.stop_grace if grace is None else grace
        self._stopping.set()
        if self._socket is not None:
            try:  # shutdown wakes the hand-over's accept() (close alone does not, on Linux)
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._socket.close()  # handover: no more accepts; reuseport: the port is let go
        deadline = time.monotonic() + grace + KILL_WAIT
        stopped: set[int] = set()
        while True:  # again for one a restart started meanwhile
            with self._lock:
                workers = [w for w in self._workers.values() if id(w) not in stopped]
            if not workers:
                break
            self._stop_workers(workers, grace, deadline)
            stopped.update(map(id, workers))
        for thread in self._threads:
            thread.join(2)
        self.flood_log.flush()


    def _stop_workers(self, workers: list[_Worker], grace: float, deadline: float) -> None:
        for worker in workers:
            self._tell(worker, "stop", grace)
        for worker in workers:
            try:
                worker.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("receive worker %d (pid %d) did not stop within %g s; killed", worker.index,
                            worker.process.pid, grace + KILL_WAIT)
                worker.process.kill()
                worker.process.wait()
        for worker in workers:
            if worker.reader is not None:
                worker.reader.join(2)
            worker.events.close()
            if worker.handover is not None:
                worker.handover.close()


def _how_ended(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"

