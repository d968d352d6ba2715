"""Readiness (/readyz): can the node take studies and get them delivered, right now?

Each check is a callable returning a CheckResult; a check that raises counts as
failed, with the exception as its detail (a broken check must not look like a pass).
The node assembles the checks (scp.node) from what it owns, and this module stays
below the layers it checks: it gets callables, never the server, spool or sinks.

- listening: the DICOM listener is up;
- spool: the spool folder is writable (a hidden temp file really is created and
  removed: a read-only remount or a full inode table shows up here) and has at least
  ``operations.min_free_bytes`` free;
- one per FHIR destination: GET <base>/metadata answers (cached a few seconds, so
  scrapes do not hammer the server), or a delivery to it succeeded within
  ``operations.ready_window`` seconds (a server may refuse /metadata to our
  credentials yet take our Bundles).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scp.store.layout import temp_file

PROBE_CACHE_SECONDS = 5.0  # a destination's /metadata answer is reused this long


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail} if self.detail else {"ok": self.ok}


Check = Callable[[], CheckResult]


class Readiness:
    """The named checks; ``report()`` runs them all (every check, not only up to the first failure)."""

    def __init__(self, checks: Mapping[str, Check]) -> None:
        self.checks = dict(checks)

    def report(self) -> dict[str, Any]:
        results = {name: _run(check) for name, check in self.checks.items()}
        failed = [name for name, result in results.items() if not result.ok]
        return {"ready": not failed, "checks": {name: r.as_json() for name, r in results.items()},
                "failed": failed}


def _run(check: Check) -> CheckResult:
    try:
        return check()
    except Exception as exc:  # a broken check is a failed one, with what broke it
        return CheckResult(False, f"the check itself failed: {type(exc).__name__}: {exc}")


def listening_check(is_listening: Callable[[], bool]) -> Check:
    def check() -> CheckResult:
        return CheckResult(True) if is_listening() else CheckResult(False, "the DICOM listener is not running")
    return check


def spool_check(folder: Path, min_free_bytes: int) -> Check:
    """Writable (try it) and at least min_free_bytes free (os.statvfs: what an unprivileged user may use)."""
    folder = Path(folder)

    def check() -> CheckResult:
        probe = folder / temp_file("readyz", os.getpid())
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            return CheckResult(False, f"spool folder {folder} is not writable: {exc.strerror or exc}")
        try:
            fs = os.statvfs(folder)
        except OSError as exc:
            return CheckResult(False, f"spool folder {folder}: cannot read the free space: {exc.strerror or exc}")
        free = fs.f_bavail * fs.f_frsize
        if free < min_free_bytes:
            return CheckResult(False, f"spool folder {folder}: {_mib(free)} free, below operations.min_free_bytes "
                                      f"({_mib(min_free_bytes)})")
        return CheckResult(True)
    return check


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class DestinationCheck:
    """A FHIR destination is reachable, or took a delivery recently.

    probe() raises when the destination does not answer (its message is the detail);
    last_delivered() is the clock time of the last successful delivery to it, or None.
    """

    def __init__(self, probe: Callable[[], None], last_delivered: Callable[[], float | None], *,
                 window: float, where: str, cache_for: float = PROBE_CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._last_delivered = last_delivered
        self._window = window
        self._where = where
        self._cache_for = cache_for
        self._clock = clock
        self._lock = threading.Lock()  # concurrent scrapes: one probe at a time, and its answer shared
        self._cached: tuple[float, CheckResult] | None = None

    def __call__(self) -> CheckResult:
        now = self._clock()
        last = self._last_delivered()
        if last is not None and now - last <= self._window:
            return CheckResult(True, f"last delivery {now - last:.0f} s ago")
        probed = self._probe_cached(now)
        if probed.ok:
            return probed
        since = "never since the node started" if last is None else f"last {now - last:.0f} s ago"
        return CheckResult(False, f"{probed.detail}; no delivery within operations.ready_window "
                                  f"({self._window:g} s; {since})")

    def _probe_cached(self, now: float) -> CheckResult:
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self._cache_for:
                return self._cached[1]
            try:
                self._probe()
                result = CheckResult(True, f"{self._where} answers")
            except Exception as exc:
                result = CheckResult(False, f"{self._where}: {exc}")
            self._cached = (self._clock(), result)
            return result
