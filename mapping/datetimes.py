"""DICOM DA/TM/offset → FHIR date and dateTime, with the precision rules of the contract.

FHIR dateTime: ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` or a full date and time WITH a zone.
A DICOM time becomes part of the result only when its zone is known (TimezoneOffsetFromUTC,
else a configured IANA zone); otherwise the result stops at the date: local time is never
labelled UTC. Invalid values are dropped with a warning that names the element, never the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

_DA = re.compile(r"(\d{4})(?:(\d{2})(\d{2})?)?")
_DA_LEGACY = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")  # ACR-NEMA 2.0 dates, still seen in old archives
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_TM_LEGACY = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?")
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


@dataclass(frozen=True, slots=True)
class PartialDate:
    year: int
    month: int | None = None
    day: int | None = None

    def fhir(self) -> str:
        text = f"{self.year:04d}"
        if self.month is not None:
            text += f"-{self.month:02d}"
            if self.day is not None:
                text += f"-{self.day:02d}"
        return text

    @property
    def complete(self) -> bool:
        return self.day is not None


@dataclass(frozen=True, slots=True)
class Time:
    hour: int
    minute: int = 0
    second: int = 0
    fraction: str = ""  # the digits after the decimal point, as given

    def fhir(self) -> str:
        text = f"{self.hour:02d}:{self.minute:02d}:{self.second:02d}"
        return text + (f".{self.fraction}" if self.fraction else "")


def parse_date(text: str | None) -> PartialDate | None:
    """A DICOM DA (``YYYYMMDD``, partial ``YYYY``/``YYYYMM``, legacy ``YYYY.MM.DD``).

    None for an empty value; ValueError for a value that is not a valid date.
    """
    text = (text or "").strip()
    if not text:
        return None
    match = _DA.fullmatch(text) or _DA_LEGACY.fullmatch(text)
    if match is None:
        raise ValueError("not a DICOM date")
    year, month, day = (int(g) if g else None for g in match.groups())
    if year == 0:
        raise ValueError("year 0000")
    if month is not None:
        # date() checks month and day ranges (including 29 February).
        date(year, month, day or 1)
    return PartialDate(year, month, day)


def parse_time(text: str | None) -> Time | None:
    """A DICOM TM (``HH``, ``HHMM``, ``HHMMSS``, ``HHMMSS.FFFFFF``, legacy ``HH:MM:SS``).

    None for an empty value; ValueError for a value that is not a valid time.
    """
    text = (text or "").strip()
    if not text:
        return None
    match = _TM.fullmatch(text) or _TM_LEGACY.fullmatch(text)
    if match is None:
        raise ValueError("not a DICOM time")
    hour, minute, second = (int(g) if g else 0 for g in match.groups()[:3])
    fraction = match.group(4) or ""
    if hour > 23 or minute > 59 or second > 60:  # 60: a leap second is valid in DICOM and FHIR
        raise ValueError("time out of range")
    return Time(hour, minute, second, fraction)


def parse_offset(text: str | None) -> timedelta | None:
    """TimezoneOffsetFromUTC (``+hhmm``/``-hhmm``, -12:00 to +14:00).

    None when empty; ValueError for anything else (``0``, ``+2500``, ``+0575``).
    """
    text = (text or "").strip()
    if not text:
        return None
    match = _OFFSET.fullmatch(text)
    if match is None:
        raise ValueError("not ±hhmm")
    sign, hours, minutes = match.group(1), int(match.group(2)), int(match.group(3))
    if minutes > 59:
        raise ValueError("minutes out of range")
    offset = timedelta(hours=hours, minutes=minutes) * (-1 if sign == "-" else 1)
    if not timedelta(hours=-12) <= offset <= timedelta(hours=14):
        raise ValueError("offset out of range")
    return offset


def format_offset(offset: timedelta) -> str:
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def zone_offset(day: PartialDate, time: Time, zone: str) -> timedelta:
    """The UTC offset of the IANA zone at that local date and time (the earlier one when ambiguous)."""
    local = datetime(day.year, day.month or 1, day.day or 1, time.hour, time.minute, min(time.second, 59),
                     tzinfo=ZoneInfo(zone))
    offset = local.utcoffset()
    assert offset is not None
    return offset


def fhir_datetime(day: PartialDate | None, time: Time | None, offset: timedelta | None,
                  zone: str | None = None) -> str | None:
    """The FHIR dateTime for already parsed values (see the module rules).

    offset: TimezoneOffsetFromUTC (wins); zone: configured IANA zone name, used without offset.
    """
    if day is None:
        return None  # a time without a date says nothing usable
    if not day.complete or time is None:
        return day.fhir()
    if offset is None and zone is not None:
        offset = zone_offset(day, time, zone)
    if offset is None:
        return day.fhir()  # never label local time as UTC
    return f"{day.fhir()}T{time.fhir()}{format_offset(offset)}"


@dataclass(frozen=True, slots=True)
class Zone:
    """The study's zone: a valid TimezoneOffsetFromUTC, else the configured IANA zone, else none."""

    offset: timedelta | None = None
    name: str | None = None


def study_zone(offset_text: str | None, configured: str | None, warnings: list[str]) -> Zone:
    try:
        offset = parse_offset(offset_text)
    except ValueError as exc:
        warnings.append(f"TimezoneOffsetFromUTC (0008,0201): invalid value ({exc}), treated as absent")
        offset = None
    return Zone(offset, configured)


def combine(date_text: str | None, time_text: str | None, zone: Zone, warnings: list[str], *,
            date_tag: str, time_tag: str) -> str | None:
    """FHIR dateTime from DICOM DA and TM text; invalid parts dropped with a warning."""
    try:
        day = parse_date(date_text)
    except ValueError as exc:
        warnings.append(f"{date_tag}: invalid date ({exc}), omitted")
        return None
    try:
        time = parse_time(time_text)
    except ValueError as exc:
        warnings.append(f"{time_tag}: invalid time ({exc}), date only")
        time = None
    return fhir_datetime(day, time, zone.offset, zone.name)


def fhir_date(date_text: str | None, warnings: list[str], *, tag: str) -> str | None:
    """FHIR date (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``) from a DICOM DA; invalid → None + warning."""
    try:
        day = parse_date(date_text)
    except ValueError as exc:
        warnings.append(f"{tag}: invalid date ({exc}), omitted")
        return None
    return day.fhir() if day is not None else None

