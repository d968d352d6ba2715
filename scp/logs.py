"""Log lines as text or JSON (``--log-format``, ``logging.format``): the formatters and their setup.

Shared by every layer like scp.config: a log call passes what it knows as
``extra={"study_uid": ..., ...}`` (names in FIELDS) and keeps its human message; the
JSON formatter puts those fields beside the message, the text formatter ignores them.
Both stamp the local time with its UTC offset, so lines from nodes in different zones
(or a node whose zone changes) can be ordered.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from typing import IO, Any

FORMATS = ("text", "json")
# What the node knows at its call sites; only these extra names are copied into a JSON line.
FIELDS = ("calling_aet", "peer", "study_uid", "instance_uid", "status", "destination", "exc_type", "exc",
          "worker")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def timestamp(created: float) -> str:
    """ISO 8601, local time with its UTC offset, milliseconds: 2026-12-01T19:26:42.123+00:00."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def dimse_status(code: int) -> str:
    """A DIMSE status as the standard writes it (0xA700), for the `status` field."""
    return f"0x{code:04X}"


class TextFormatter(logging.Formatter):
    """The human format, with the zone in the time."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the known FIELDS, exceptions."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": timestamp(record.created), "level": record.levelname,
                                 "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII only (non-ASCII as \u escapes): the line stays valid JSON whatever the
        # encoding of the stream it goes to (stderr under a C locale included).
        return json.dumps(entry, ensure_ascii=True, default=str)


def formatter(log_format: str) -> logging.Formatter:
    if log_format not in FORMATS:
        raise ValueError(f"log format: expected one of {FORMATS}, got {log_format!r}")
    return JsonFormatter() if log_format == "json" else TextFormatter()


class StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each line (not as it was when configured), like
    logging's last resort: a caller that swaps stderr (a test harness) never gets lines
    sent to a closed stream."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass  # always the current sys.stderr


def configure(log_format: str, level: int) -> None:
    """Log to stderr in this format at this level; replaces an earlier configure's handler only
    (a command may configure again; handlers others installed stay)."""
    handler = StderrHandler()
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python's warnings go to stderr on their own, as bare text: through logging they are
    # lines of the chosen format too (a JSON log stays one object per line).
    logging.captureWarnings(True)


# The loggers whose own levels a command sets (scp.cli), carried with `settings`.
TUNED_LOGGERS = ("pynetdicom", "pydicom")


def settings() -> dict[str, Any]:
    """How this process logs (format, root level, the tuned loggers' levels), for `apply`
    in a process it starts (a receive worker logs as the node does)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, StderrHandler)), None)
    log_format = "json" if handler is not None and isinstance(handler.formatter, JsonFormatter) else "text"
    return {"format": log_format, "level": root.level,
            "levels": {name: logging.getLogger(name).level for name in TUNED_LOGGERS}}


def apply(given: dict[str, Any], worker: int | None = None) -> None:
    """Log as `settings()` said another process does; a receive worker's lines say which one
    (the logger's name gets "/w<N>", JSON lines a "worker" field)."""
    configure(given["format"], given["level"])
    for name, level in given["levels"].items():
        logging.getLogger(name).setLevel(level)
    if worker is not None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, StderrHandler):
                handler.addFilter(WorkerTag(worker))


class WorkerTag(logging.Filter):
    """Marks each line of a receive worker's process with its number."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = self.worker
            record.name = f"{record.name}/w{self.worker}"
        return True
