"""The end-of-study hook: a program run after each delivered study ([hooks] on_delivered).

The equivalent of dcmtk storescp's --exec-on-eostudy and Orthanc's OnStableStudy:

    [hooks]
    on_delivered = ["/usr/local/bin/study-done", "{study_uid}", "{output}"]

- `HookRunner.run(delivered)` runs the program once: an argv, no shell, the placeholders
  filled in from the delivery (HOOK_PLACEHOLDERS; never patient data), stdin empty,
  killed with its process group after `hooks.timeout`. Its output goes to the log at
  DEBUG (the first lines), its exit status at INFO (0) or WARNING. It never raises.
- `BackgroundHooks` runs them off the delivery thread: one hook thread and a bounded
  queue (`hooks.max_pending`). One thread, so hooks run one at a time in delivery order
  (two parts of a study never race in the operator's script); a slow hook delays the next
  hook, never the next delivery. A full queue drops the study's hook with a WARNING: a
  hook that cannot keep up must not grow the node's memory without bound.
- `hook_runner(config.hooks)` checks at start-up that the program is an executable file.
  The node hands `BackgroundHooks.submit` to the delivery worker (an observer: its errors
  are logged, never raised into the delivery); `retry` calls `HookRunner.run` itself.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from mapping.errors import ConfigurationError
from scp.config import HooksConfig
from scp.pipeline.delivery import DeliveryReport
from scp.store.layout import output_file

log = logging.getLogger("scp.pipeline.hooks")

OUTPUT_LINES = 20  # lines of the hook's stdout/stderr logged (DEBUG); the rest is counted
KILL_GRACE = 5.0  # seconds to collect a killed hook's remaining output
# The FHIR sink's result starts with the reference it wrote ("ImagingStudy/17 updated at ...",
# scp.sinks.fhir.sink.FhirSink.deliver).
FHIR_REFERENCE = re.compile(r"^([A-Za-z]+/[A-Za-z0-9\-.]{1,64})(?:\s|$)")


@dataclass(frozen=True)
class Delivered:
    """What the hook may be told about one delivered study (no patient data)."""

    study_uid: str
    instances: int
    series: int
    output: str  # the disk sink's output file (absolute), "" when the disk sink did not take it
    fhir: str  # the FHIR sink's reference, "" when the FHIR sink did not take it

    def values(self) -> dict[str, str]:
        return {"study_uid": self.study_uid, "output": self.output, "instances": str(self.instances),
                "series": str(self.series), "fhir": self.fhir}


def delivered_from_report(report: DeliveryReport, output_dir: Path | None) -> Delivered:
    """The hook's view of a delivery report; `output_dir` is the disk sink's folder (None: no disk sink)."""
    output = ""
    if output_dir is not None and "disk" in report.sinks:
        output = str((Path(output_dir) / output_file(report.study_uid)).absolute())
    found = FHIR_REFERENCE.match(report.sinks.get("fhir", ""))
    return Delivered(report.study_uid, report.instances, report.series, output,
                     found.group(1) if found else "")


def check_program(argv: tuple[str, ...], where: str = "hooks.on_delivered") -> None:
    """ConfigurationError unless argv[0] is an executable file (checked at start-up, not at the first study)."""
    program = argv[0]
    if not os.path.isfile(program):
        raise ConfigurationError(f"{where}: program {program} not found (or not a file)")
    if not os.access(program, os.X_OK):
        raise ConfigurationError(f"{where}: program {program} is not executable (chmod +x?)")


class HookRunner:
    """Runs the hook program for one delivered study, synchronously (see the module docstring)."""

    def __init__(self, argv: tuple[str, ...], timeout: float) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._running: subprocess.Popen | None = None

    def command(self, delivered: Delivered) -> list[str]:
        values = delivered.values()
        return [self.argv[0], *(arg.format(**values) for arg in self.argv[1:])]

    def run(self, delivered: Delivered) -> int | None:
        """Run the hook; its exit status, None when it could not start or timed out. Never raises."""
        uid, program = delivered.study_uid, self.argv[0]
        try:
            return self._run(delivered)
        except Exception:  # a bug here must not reach the delivery (or stop the hook thread)
            log.exception("study %s: hook %s failed unexpectedly", uid, program)
            return None

    def _run(self, delivered: Delivered) -> int | None:
        uid, program = delivered.study_uid, self.argv[0]
        try:
            # A session of its own: a timeout kills the hook's children too (a shell script's commands).
            process = subprocess.Popen(self.command(delivered), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:  # removed or made non-executable since start-up
            log.warning("study %s: hook %s could not be started: %s", uid, program, exc)
            return None
        with self._lock:
            self._running = process
        try:
            try:
                out, err = process.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                try:
                    out, err = process.communicate(timeout=KILL_GRACE)
                except subprocess.TimeoutExpired:  # a child left its own process group and holds the pipes
                    out, err = b"", b""
                _log_output(uid, program, out, err)
                log.warning("study %s: hook %s still running after %g s (hooks.timeout): killed", uid, program,
                            self.timeout)
                return None
        finally:
            with self._lock:
                self._running = None
        _log_output(uid, program, out, err)
        if process.returncode == 0:
            log.info("study %s: hook %s exited with 0", uid, program)
        else:
            log.warning("study %s: hook %s failed with exit status %d", uid, program, process.returncode)
        return process.returncode

    def kill(self) -> None:
        """Kill the hook running now, if any (the node stops)."""
        with self._lock:
            process = self._running
        if process is not None:
            _kill_group(process)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def _log_output(uid: str, program: str, out: bytes, err: bytes) -> None:
    if not log.isEnabledFor(logging.DEBUG):
        return
    for name, data in (("stdout", out), ("stderr", err)):
        lines = data.decode("utf-8", "replace").splitlines()
        for line in lines[:OUTPUT_LINES]:
            log.debug("study %s: hook %s %s: %s", uid, program, name, line)
        if len(lines) > OUTPUT_LINES:
            log.debug("study %s: hook %s %s: (%d more line(s))", uid, program, name, len(lines) - OUTPUT_LINES)


class BackgroundHooks:
    """The hook thread: `submit` never blocks; hooks run one at a time, in order (module docstring)."""

    def __init__(self, runner: HookRunner, max_pending: int) -> None:
        self.runner = runner
        self._queue: queue.Queue[Delivered | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None

    def submit(self, delivered: Delivered) -> bool:
        """Queue the hook for a delivered study; False (logged) when max_pending hooks already wait."""
        try:
            self._queue.put_nowait(delivered)
        except queue.Full:
            log.warning("study %s: hook %s not run: %d hook(s) already waiting (hooks.max_pending; "
                        "is the hook slower than the deliveries?)", delivered.study_uid, self.runner.argv[0],
                        self._queue.maxsize)
            return False
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hooks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            delivered = self._queue.get()
            if delivered is None:
                return
            self.runner.run(delivered)

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the hook running now; hooks still waiting are not run (logged with their studies)."""
        skipped = []
        while True:
            try:
                delivered = self._queue.get_nowait()
            except queue.Empty:
                break
            if delivered is not None:
                skipped.append(delivered.study_uid)
        if skipped:
            log.warning("stopping: hook not run for %d delivered study(ies): %s", len(skipped), ", ".join(skipped))
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=1)  # emptied above: only a racing submit could fill it
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("stopping: hook %s still running; killed", self.runner.argv[0])
            self.runner.kill()
            self._thread.join(KILL_GRACE)


def hook_runner(hooks: HooksConfig) -> HookRunner | None:
    """The configured hook, its program checked (ConfigurationError); None when none is configured."""
    if hooks.on_delivered is None:
        return None
    check_program(hooks.on_delivered)
    return HookRunner(hooks.on_delivered, hooks.timeout)
