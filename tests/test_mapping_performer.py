"""ImagingStudy.series.performer (mapping/README.md, "ImagingStudy": series.performer), on real
headers: MR_small.dcm carries OperatorsName; PerformingPhysicianName is added to CT_small.dcm."""

from __future__ import annotations

from pydicom.data import get_testdata_file

from tests.mapping_cases import CT_SMALL, instance, read, reread, study_of

PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def performers(study: dict) -> list[tuple[str, str]]:
    return [(p["function"]["coding"][0]["code"], p["actor"]["display"])
            for s in study["series"] for p in s.get("performer", [])]


def test_performing_physicians_are_performers_with_function_prf():
    ds = read(CT_SMALL)
    ds.PerformingPhysicianName = ["Smith^John^^Dr", "Jones^Ann"]
    [first, _] = study_of(ds)["series"][0]["performer"]
    assert first["function"] == {"coding": [{"system": PARTICIPATION, "code": "PRF", "display": "performer"}]}
    assert performers(study_of(ds)) == [("PRF", "Dr John Smith"), ("PRF", "Ann Jones")]


def test_operators_are_performers_with_function_sprf():
    ds = read(get_testdata_file("MR_small.dcm"))
    ds.OperatorsName = "Miller^Eve"
    assert performers(study_of(ds)) == [("SPRF", "Eve Miller")]


def test_physician_then_operator_and_each_person_once_per_series():
    ds = [instance(1, n, PerformingPhysicianName="Smith^John", OperatorsName=["Miller^Eve", "Miller^Eve"])
          for n in (1, 2)]
    assert performers(study_of(*ds)) == [("PRF", "John Smith"), ("SPRF", "Eve Miller")]


def test_each_series_has_its_own_performers():
    study = study_of(instance(1, 1, OperatorsName="Miller^Eve"), instance(2, 1))
    assert "performer" in study["series"][0] and "performer" not in study["series"][1]


def test_names_read_from_a_part10_file_are_the_same_performers():
    ds = instance(PerformingPhysicianName="Smith^John", OperatorsName=["Miller^Eve", "Doe^Ann"])
    assert performers(study_of(reread(ds))) == performers(study_of(ds)) == [
        ("PRF", "John Smith"), ("SPRF", "Eve Miller"), ("SPRF", "Ann Doe")]
