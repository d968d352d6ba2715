"""Per-study idle timers: a study is complete when no instance of it arrived for idle_timeout seconds.

Arrivals come from every association and sender; the timer of a study restarts with
each. A study completes with the instances that arrived since its last completion
(its "part"); instances arriving later start a new part, which completes in turn and
is merged by the sinks.

`CompletionTracker` is driven by an injected clock: `arrived()` and `poll(now)` are
all a test needs. `start()` runs a thread that sleeps until the next study is due and
hands each completed part to `on_complete(study_uid, sop_uids)`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger("scp.pipeline.completion")

Clock = Callable[[], float]
OnComplete = Callable[[str, frozenset[str]], None]


@dataclass
class _Part:
    last_arrival: float
    sop_uids: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class CompletedPart:
    study_uid: str
    sop_uids: frozenset[str]


class CompletionTracker:
    def __init__(self, idle_timeout: float, on_complete: OnComplete | None = None, *,
                 clock: Clock = time.monotonic) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout: expected a positive number of seconds, got {idle_timeout!r}")
        self.idle_timeout = float(idle_timeout)
        self._on_complete = on_complete
        self._clock = clock
        self._parts: dict[str, _Part] = {}
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def arrived(self, study_uid: str, sop_uid: str) -> None:
        """An instance of study_uid was stored: (re)start the study's timer. Cheap: the hot path calls it."""
        now = self._clock()
        with self._changed:
            part = self._parts.get(study_uid)
            if part is None:
                self._parts[study_uid] = _Part(now, {sop_uid})
                self._changed.notify()  # a new study may be due before the one being waited for
            else:
                part.last_arrival = now
                part.sop_uids.add(sop_uid)

    def resume(self, studies: dict[str, Iterable[str]]) -> None:
        """Studies found in the spool at start: each completes idle_timeout from now."""
        for study_uid, sop_uids in studies.items():
            for sop_uid in sop_uids:
                self.arrived(study_uid, sop_uid)

    def poll(self, now: float | None = None) -> list[CompletedPart]:
        """Take the parts whose study has been idle for idle_timeout at `now` (oldest first)."""
        now = self._clock() if now is None else now
        with self._changed:
            due = [(part.last_arrival, uid) for uid, part in self._parts.items()
                   if now - part.last_arrival >= self.idle_timeout]
            due.sort()
            return [CompletedPart(uid, frozenset(self._parts.pop(uid).sop_uids)) for _, uid in due]

    def next_due(self) -> float | None:
        """Clock time at which the next study completes (None when nothing is waiting)."""
        with self._changed:
            return self._next_due_locked()

    def waiting(self) -> dict[str, int]:
        """Study UID -> instances received since its last completion."""
        with self._changed:
            return {uid: len(p.sop_uids) for uid, p in self._parts.items()}

    # --- the timer thread -----------------------------------------------------------------

    def start(self) -> None:
        if self._on_complete is None:
            raise ValueError("on_complete: needed to run the timer thread")
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        assert self._on_complete is not None
        while True:
            with self._changed:
                if self._stopping:
                    return
                due_at = self._next_due_locked()
                delay = None if due_at is None else due_at - self._clock()
                if delay is None or delay > 0:
                    self._changed.wait(delay)
                    continue
            for part in self.poll():
                try:
                    self._on_complete(part.study_uid, part.sop_uids)
                except Exception:  # an observer: log, keep the timers running
                    log.exception("study %s: handing the completed study on failed", part.study_uid)

    def _next_due_locked(self) -> float | None:
        if not self._parts:
            return None
        return min(p.last_arrival for p in self._parts.values()) + self.idle_timeout
