"""Dates and times (mapping/README.md, "Dates, times and time zones"): precision follows what the zone allows."""

from __future__ import annotations

import pytest

from mapping.datetimes import Zone, combine, fhir_date, parse_offset
from tests.mapping_cases import CT_SMALL, as_json, convert, instance, read, study_of

# Several cases set invalid values on purpose; pydicom warns about them when they are set.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning",
                                        "ignore:The value length:UserWarning")


def started(date: str | None, time: str | None, offset: str | None = None, zone: str | None = None):
    warnings: list[str] = []
    try:
        parsed = parse_offset(offset)
    except ValueError:
        parsed = None
    value = combine(date, time, Zone(parsed, zone), warnings, date_tag="StudyDate", time_tag="StudyTime")
    return value, warnings


def test_date_time_and_offset_give_full_precision_with_the_offset():
    assert started("20050906", "101530", "+0200") == ("2005-09-06T10:15:30+02:00", [])


def test_real_file_offset_is_used():
    assert study_of(read(CT_SMALL))["started"] == "2004-01-19T07:27:30-05:00"  # CT_small.dcm has -0500


@pytest.mark.parametrize("time,expected", [("10", "10:00:00"), ("1015", "10:15:00"), ("101530", "10:15:30")])
def test_a_partial_time_is_completed_with_zeros(time, expected):
    assert started("20050906", time, "-0500")[0] == f"2005-09-06T{expected}-05:00"


def test_fractions_of_a_second_are_kept():
    assert started("20050906", "101530.123", "+0100")[0] == "2005-09-06T10:15:30.123+01:00"


@pytest.mark.parametrize("time,expected", [("141516.123", "14:15:16.123"), ("141516.1", "14:15:16.1"),
                                           ("141516.000", "14:15:16.000"), ("141516.123456", "14:15:16.123456")])
def test_the_output_keeps_the_precision_dicom_gave_never_padded_to_six_digits(time, expected):
    study = convert(instance(StudyDate="20050906", StudyTime=time, TimezoneOffsetFromUTC="+0000",
                             SeriesDate="20050906", SeriesTime=time)).imaging_study
    assert study["started"] == study["series"][0]["started"] == f"2005-09-06T{expected}Z"


def test_configured_iana_zone_applies_without_offset_including_daylight_saving():
    assert started("20050906", "1015", zone="Europe/Berlin")[0] == "2005-09-06T10:15:00+02:00"
    assert started("20050106", "1015", zone="Europe/Berlin")[0] == "2005-01-06T10:15:00+01:00"


def test_timezone_offset_from_utc_wins_over_the_configured_zone():
    assert started("20050906", "1015", "-0500", zone="Europe/Berlin")[0] == "2005-09-06T10:15:00-05:00"


def test_without_a_zone_only_the_date_is_given_never_local_time_as_utc():
    value, warnings = started("20050906", "101530")
    assert value == "2005-09-06" and warnings == []


def test_a_date_without_time_has_date_precision():
    assert started("20050906", None, "+0200")[0] == "2005-09-06"


def test_a_time_without_date_gives_nothing():
    assert started(None, "101530", "+0200")[0] is None
    assert "started" not in study_of(instance(StudyTime="101530", TimezoneOffsetFromUTC="+0200"))


@pytest.mark.parametrize("date,expected", [("2005", "2005"), ("200509", "2005-09")])
def test_partial_dates_keep_their_precision(date, expected):
    assert started(date, "101530", "+0200")[0] == expected


def test_legacy_dotted_dates_are_accepted():
    assert started("2005.09.06", "1015", "+0200")[0] == "2005-09-06T10:15:00+02:00"
    assert fhir_date("1970.01.31", [], tag="PatientBirthDate") == "1970-01-31"


@pytest.mark.parametrize("date", ["20051306", "20050230", "2005-09-06", "yesterday", "00000000"])
def test_an_invalid_date_is_omitted_with_a_warning_naming_the_element(date):
    value, warnings = started(date, "1015", "+0200")
    assert value is None
    assert len(warnings) == 1 and "StudyDate" in warnings[0] and date not in warnings[0]


def test_an_invalid_time_leaves_the_date_with_a_warning():
    value, warnings = started("20050906", "2561", "+0200")
    assert value == "2005-09-06" and len(warnings) == 1 and "StudyTime" in warnings[0]


@pytest.mark.parametrize("offset", ["0", "+2500", "+0575", "0500", "-1300"])
def test_an_invalid_offset_is_treated_as_absent_with_a_warning(offset):
    resources = convert(instance(StudyDate="20050906", StudyTime="1015", TimezoneOffsetFromUTC=offset))
    assert as_json(resources.imaging_study)["started"] == "2005-09-06"  # date only: no zone left
    assert any("TimezoneOffsetFromUTC (0008,0201)" in w for w in resources.warnings)


def test_an_invalid_offset_falls_back_to_the_configured_zone():
    study = study_of(instance(StudyDate="20050906", StudyTime="1015", TimezoneOffsetFromUTC="+2500"),
                     timezone="America/New_York")
    assert study["started"] == "2005-09-06T10:15:00-04:00"


def test_series_started_uses_the_study_level_offset():
    study = study_of(instance(StudyDate="20050906", StudyTime="1015", SeriesDate="20050906", SeriesTime="1120",
                              TimezoneOffsetFromUTC="+0930"))
    assert study["series"][0]["started"] == "2005-09-06T11:20:00+09:30"
