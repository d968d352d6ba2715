"""StudyDate windows for QIDO-RS, pure (no clock: `today` is passed in).

A backfill walks [since, until] in windows of sync.window_days, oldest first. A window
whose query returns page_size results may hold more than the server returned (servers
cap results, and the sync asks for at most page_size): it is split in two halves and
each half is queried instead. A single day cannot be split; it is listed page by page
(offset) instead.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

EARLIEST = dt.date(1900, 1, 1)


@dataclass(frozen=True, order=True)
class Window:
    first: dt.date
    last: dt.date  # inclusive, as DICOM's date range "first-last"

    def __post_init__(self) -> None:
        if self.last < self.first:
            raise ValueError(f"window: last {self.last} before first {self.first}")

    @property
    def query(self) -> str:
        """The QIDO-RS StudyDate value."""
        first, last = self.first.strftime("%Y%m%d"), self.last.strftime("%Y%m%d")
        return first if first == last else f"{first}-{last}"

    @property
    def key(self) -> str:
        return self.query if "-" in self.query else f"{self.query}-{self.query}"

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    def split(self) -> tuple[Window, Window] | None:
        """Two halves, or None for a single day."""
        if self.days == 1:
            return None
        middle = self.first + dt.timedelta(days=self.days // 2 - 1)
        return Window(self.first, middle), Window(middle + dt.timedelta(days=1), self.last)

    @classmethod
    def from_key(cls, key: str) -> Window:
        first, last = key.split("-")
        return cls(parse_date(first), parse_date(last))


def parse_date(text: str) -> dt.date:
    """YYYYMMDD or YYYY-MM-DD; ValueError naming the text otherwise."""
    digits = text.replace("-", "")
    try:
        if len(digits) != 8:
            raise ValueError
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise ValueError(f"not a date YYYYMMDD or YYYY-MM-DD: {text!r}") from None


def windows(since: dt.date, until: dt.date, days: int) -> list[Window]:
    """[since, until] cut into windows of `days` days, oldest first (the last one may be shorter)."""
    if days < 1:
        raise ValueError(f"days: expected at least 1, got {days}")
    result, first = [], since
    while first <= until:
        last = min(first + dt.timedelta(days=days - 1), until)
        result.append(Window(first, last))
        first = last + dt.timedelta(days=1)
    return result


def recent_windows(today: dt.date, days: int) -> list[Window]:
    """The window polling re-queries: the last `days` days up to today."""
    return [Window(today - dt.timedelta(days=days - 1), today)]
