"""Read and parse file headers in worker processes (``convert --jobs N``).

Only file paths go to the workers and only results come back: an InstanceHeader
(about half a kilobyte pickled) or a SkippedFile, never a Dataset, so the parent's
memory stays as flat as with one process. Results are taken in the files' order
(Executor.map), so the parent groups by study exactly as one process does and the
output is the same byte for byte.

The log lines a file causes in a worker (pydicom's warnings naming the file, DEBUG
details) are not written by the worker: they travel back with the file's result and
the parent emits them through its own handlers, in the files' order. The lines, their
order and their format are those of one process; a progress bar is never torn by a
worker writing to the terminal.

Ctrl-C: the terminal sends SIGINT to the whole process group. Workers ignore it, the
parent's KeyboardInterrupt drops the chunks not started and leaves; each worker ends
after the chunk it is reading, so there is one clean exit and no traceback from a worker.
A worker that is killed (out of memory) ends the command with one line (WorkerDied,
exit status 2), never a hang.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mapping.errors import DicomFhirError

log = logging.getLogger("scp.sources.parallel")

# Files per task sent to a worker: large enough that the per-task pickling and queue
# overhead is small against a header parse (~0.5 ms), small enough that the progress bar
# moves and the last chunks spread over every worker.
MAX_CHUNK = 32

# What one file gives: the reader's result (scp.sources.folder: an InstanceHeader or a
# SkippedFile) and the log records reading it made.
Outcome = tuple[Any, list[logging.LogRecord]]


class WorkerDied(DicomFhirError):
    """A worker process ended without returning its results (killed): the conversion cannot be complete."""


def default_jobs() -> int:
    """The CPUs this process may run on (its affinity, as a container or taskset limits it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def chunk_size(files: int, jobs: int) -> int:
    """About 8 tasks per worker, at most MAX_CHUNK files each."""
    return max(1, min(MAX_CHUNK, files // (jobs * 8)))


def read_in_workers(files: Sequence[Path], jobs: int, read: Callable[[Path], Any]) -> Iterator[tuple[Path, Outcome]]:
    """(path, (read(path), log records)) for each file, in the files' order.

    read: a module-level function (the workers receive it by name); it must return a
    picklable value, never raise for a bad file. jobs worker processes, at most one per
    file. The caller emits the records (emit_records), then handles the result.
    """
    workers = max(1, min(jobs, len(files)))
    # Ctrl-C while the pool starts and map() queues the chunks can leave concurrent.futures'
    # bookkeeping half done: the interpreter then waits at exit for results no worker will send
    # (seen with a few hundred chunks). SIGINT is held until the chunks are queued, and raised
    # in the loop below, where the shutdown in `finally` handles it.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    executor = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_worker_start)
    try:
        try:
            # Frozen objects are out of the collector's reach: a worker's collections would otherwise
            # touch, and so copy, every page it inherited (measured: about 10% of a worker's time).
            # map() submits every chunk at once, which forks the workers.
            gc.freeze()
            try:
                results = executor.map(_Reader(read), files, chunksize=chunk_size(len(files), workers))
            finally:
                gc.unfreeze()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for path, outcome in zip(files, results):
            yield path, outcome
    except BrokenProcessPool:
        # A worker was killed (the OOM killer, a signal): its files' results are lost. A pool
        # that waited for them would hang; this ends the command with one line instead.
        raise WorkerDied("convert: a worker process reading headers ended abruptly (killed, or out of "
                         "memory?); nothing was written; run again, or with --jobs 1") from None
    finally:
        # On Ctrl-C or an error: drop the chunks not started; each worker ends after its
        # current chunk (at most MAX_CHUNK headers), without a result being waited for.
        executor.shutdown(wait=False, cancel_futures=True)


def emit_records(records: list[logging.LogRecord]) -> None:
    """Emit a worker's log records through this process's handlers (levels were applied in the worker)."""
    for record in records:
        logging.getLogger(record.name).handle(record)


def _context() -> multiprocessing.context.BaseContext:
    # fork: a worker starts in milliseconds with pydicom, the mapping and the logging levels
    # already loaded; spawn would re-import them (about a second per worker), longer than
    # reading a few thousand headers. A worker runs only _Reader: it never touches what the
    # parent's other threads (a progress bar's monitor) may hold.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class _Collect(logging.Handler):
    """Keeps the records of the file being read, made picklable."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(_portable(record))


def _portable(record: logging.LogRecord) -> logging.LogRecord:
    """The record with its message rendered and its traceback as text (a traceback does not pickle).

    exc_text is what the text formatter prints; exc_type/exc are the fields the JSON
    formatter (scp.logs) writes, so a DEBUG traceback reads the same from a worker.
    """
    record.msg, record.args = record.getMessage(), None
    if record.exc_info:
        text = logging.Formatter().formatException(record.exc_info)
        if record.exc_info[0] is not None:
            record.exc_type = record.exc_info[0].__name__
            record.exc = text
        record.exc_text, record.exc_info = text, None
    return record


def _worker_start() -> None:
    # The parent handles Ctrl-C for everyone (see the module docstring).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    root = logging.getLogger()
    for handler in list(root.handlers):  # inherited by fork: the parent writes, not the worker
        root.removeHandler(handler)
    root.addHandler(_Collect())


class _Reader:
    """read(path) with the log records it made (a class, not a closure: it goes to the workers by pickle)."""

    def __init__(self, read: Callable[[Path], Any]) -> None:
        self.read = read

    def __call__(self, path: Path) -> Outcome:
        collect = next(h for h in logging.getLogger().handlers if isinstance(h, _Collect))
        collect.records = []
        return self.read(path), collect.records
