"""Merging (mapping/README.md, "Merging"): a study arriving in several parts, or again."""

from __future__ import annotations

import dataclasses

import pytest
from pydicom.dataset import Dataset

from mapping import MappingError, PatientMismatchError, merge_imaging_study, merge_resources, render
from mapping.fhirjson import same_patient
from tests.mapping_cases import as_json, convert, instance

WADO = "https://pacs.example.org/dicom-web"


def merged_json(existing, new):
    return as_json(merge_imaging_study(existing.imaging_study, new.imaging_study))


def test_series_and_instances_are_united_by_uid():
    study = merged_json(convert(instance(1, 1), instance(1, 2)), convert(instance(1, 3), instance(2, 1)))
    assert [s["uid"].rsplit(".", 1)[1] for s in study["series"]] == ["1", "2"]
    assert [i["number"] for i in study["series"][0]["instance"]] == [1, 2, 3]


def test_counts_are_recomputed():
    study = merged_json(convert(instance(1, 1), instance(1, 2)), convert(instance(1, 2), instance(2, 1)))
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (2, 3)
    assert [s["numberOfInstances"] for s in study["series"]] == [2, 1]


def test_a_resent_instance_replaces_its_earlier_version():
    old = convert(instance(1, 1, ImageType=["ORIGINAL", "PRIMARY"]))
    new = convert(instance(1, 1, ImageType=["DERIVED", "SECONDARY"]))
    [item] = merged_json(old, new)["series"][0]["instance"]
    assert item["title"] == "DERIVED\\SECONDARY"


def test_a_value_missing_from_the_new_part_never_erases_one_already_present():
    old = convert(instance(1, 1, StudyDescription="CT Thorax", SeriesDescription="Axial", AccessionNumber="A1",
                           StudyDate="20050906", StudyTime="1015", TimezoneOffsetFromUTC="+0200"))
    new = convert(instance(1, 2))
    study = merged_json(old, new)
    assert study["description"] == "CT Thorax" and study["series"][0]["description"] == "Axial"
    assert study["started"] == "2005-09-06T10:15:00+02:00"
    assert [i.get("type", {}).get("coding", [{}])[0].get("code") for i in study["identifier"]] == [None, "ACSN"]


def test_a_less_precise_start_does_not_replace_a_more_precise_one():
    old = convert(instance(StudyDate="20050906", StudyTime="1015", TimezoneOffsetFromUTC="+0200"))
    new = convert(instance(StudyDate="20050906", StudyTime="1015"))  # no zone: date only
    assert merged_json(old, new)["started"] == "2005-09-06T10:15:00+02:00"


def test_identifiers_modalities_and_endpoints_are_unions_without_duplicates():
    old = convert(instance(1, 1, Modality="MR", AccessionNumber="A1"), dicomweb_url=WADO)
    new = convert(instance(2, 1, Modality="CT", AccessionNumber="A1"), dicomweb_url=WADO)
    study = merged_json(old, new)
    assert len(study["identifier"]) == 2
    assert [m["code"] for m in study["modality"]] == ["MR", "CT"]
    assert len(study["endpoint"]) == 1


def test_merging_the_same_part_twice_gives_the_same_resource():
    whole = convert(instance(1, 1), instance(1, 2))
    part = convert(instance(1, 2), instance(2, 1))
    once = merge_imaging_study(whole.imaging_study, part.imaging_study)
    assert as_json(merge_imaging_study(once, part.imaging_study)) == as_json(once)
    assert as_json(merge_imaging_study(whole.imaging_study, whole.imaging_study)) == as_json(whole.imaging_study)


def test_parts_merged_in_any_order_give_the_study_converted_at_once():
    parts = [convert(instance(2, 1)), convert(instance(1, 2), instance(1, 1)), convert(instance(3, 4))]
    whole = convert(instance(1, 1), instance(1, 2), instance(2, 1), instance(3, 4))
    forward = merge_resources(merge_resources(parts[0], parts[1]), parts[2])
    backward = merge_resources(merge_resources(parts[2], parts[1]), parts[0])
    assert render(forward) == render(backward) == render(whole)


def test_the_existing_subject_is_kept():
    existing = as_json(convert(instance()).imaging_study)
    existing["subject"] = {"reference": "Patient/7", "identifier": existing["subject"]["identifier"]}
    merged = merge_imaging_study(existing, convert(instance(1, 2)).imaging_study)
    assert merged["subject"]["reference"] == "Patient/7"


def test_subjects_with_different_patient_identifiers_are_never_merged():
    with pytest.raises(PatientMismatchError):
        merge_imaging_study(convert(instance(PatientID="P1")).imaging_study,
                            convert(instance(1, 2, PatientID="P2")).imaging_study)


def test_merge_resources_refuses_another_patient():
    with pytest.raises(PatientMismatchError):
        merge_resources(convert(instance(PatientID="P1")), convert(instance(1, 2, PatientID="P2")))


def test_merge_resources_fills_patient_values_but_never_overwrites_them():
    existing = convert(instance(PatientName="Doe^Jane", PatientSex=None))
    new = convert(instance(1, 2, PatientName="Other^Name", PatientSex="F", PatientBirthDate="19700131"))
    patient = as_json(merge_resources(existing, new).patient)
    assert patient["name"][0]["family"] == "Doe"
    assert (patient["gender"], patient["birthDate"]) == ("female", "1970-01-31")


def test_merge_resources_refuses_another_study():
    with pytest.raises(MappingError):
        merge_resources(convert(instance(study="1.2.3")), convert(instance(study="1.2.4")))


def test_merge_resources_keeps_the_endpoint_when_the_new_part_has_none():
    merged = merge_resources(convert(instance(), dicomweb_url=WADO), convert(instance(1, 2)))
    document = render(merged)
    assert [e["resource"]["resourceType"] for e in document["entry"]] == ["Patient", "Endpoint", "ImagingStudy"]


def test_a_changed_endpoint_is_added_beside_the_old_one_and_every_reference_resolves():
    merged = merge_resources(convert(instance(), dicomweb_url=WADO), convert(instance(), dicomweb_url=WADO + "2"))
    document = render(merged)
    urls = {e["fullUrl"] for e in document["entry"]}
    study = document["entry"][-1]["resource"]
    assert len(study["endpoint"]) == 2 and all(e["reference"] in urls for e in study["endpoint"])


def test_a_local_endpoint_reference_to_no_endpoint_of_the_study_is_dropped():
    existing = convert(instance(), dicomweb_url=WADO)
    existing = dataclasses.replace(existing, endpoints=())  # as from a document whose Endpoint was lost
    merged = merge_resources(existing, convert(instance(1, 2)))
    assert "endpoint" not in merged.imaging_study and "endpoint" not in merged.imaging_study["series"][0]


# --- issue #11: the Patient is matched on its primary identifier, system and value ------------

def _identifier(system, value="P1"):
    return {"value": value} if system is None else {"system": system, "value": value}


@pytest.mark.parametrize("ours,theirs,same", [
    ("urn:a", "urn:a", True),  # same system, same value
    ("urn:a", "urn:b", False),  # the same value under another issuer is another patient
    ("urn:a", None, False),  # a bare value cannot prove identity once a system is known
    (None, "urn:a", False),  # ... either way
    (None, None, True),  # both bare: the value is all either side knows
])
def test_patient_match_matrix(ours, theirs, same):
    assert same_patient([_identifier(ours)], [_identifier(theirs)]) is same
    assert same_patient([_identifier(ours)], [_identifier(ours, "P2")]) is False


def test_only_our_primary_identifier_is_matched_against_all_of_theirs():
    ours = [_identifier("urn:a", "P1"), _identifier("urn:b", "B-7")]
    assert same_patient(ours, [_identifier("urn:x", "X"), _identifier("urn:a", "P1")])
    assert not same_patient(ours, [_identifier("urn:b", "B-7")])


def test_subjects_with_the_same_value_under_different_systems_are_never_merged():
    with pytest.raises(PatientMismatchError):
        merge_imaging_study(convert(instance(PatientID="P1"), patient_identifier_system="urn:a").imaging_study,
                            convert(instance(1, 2, PatientID="P1"), patient_identifier_system="urn:b").imaging_study)


def test_a_bare_subject_is_never_merged_with_one_that_has_a_system():
    with pytest.raises(PatientMismatchError):
        merge_imaging_study(convert(instance(PatientID="P1")).imaging_study,
                            convert(instance(1, 2, PatientID="P1"), patient_identifier_system="urn:a").imaging_study)


def test_merge_resources_refuses_the_same_patient_id_under_another_system():
    with pytest.raises(PatientMismatchError):
        merge_resources(convert(instance(PatientID="P1"), patient_identifier_system="urn:a"),
                        convert(instance(1, 2, PatientID="P1")))


def test_merge_resources_adds_the_other_identifiers_the_existing_patient_lacks():
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = "B-7", "HOSP_B"
    options = {"patient_identifier_system": "urn:a", "issuer_systems": {"HOSP_B": "urn:b"}}
    existing = convert(instance(PatientID="P1"), **options)
    new = convert(instance(1, 2, PatientID="P1", OtherPatientIDsSequence=[other]), **options)
    patient = as_json(merge_resources(existing, new).patient)
    assert [(i["system"], i["value"]) for i in patient["identifier"]] == [("urn:a", "P1"), ("urn:b", "B-7")]
    assert merge_resources(new, existing).patient["identifier"] == patient["identifier"]


def test_instances_whose_issuers_resolve_to_the_same_system_are_one_patient():
    options = {"use_issuer_of_patient_id": True, "issuer_systems": {"HOSP_A": "urn:oid:1.2.3"}}
    resources = convert(instance(1, 1, PatientID="P1", IssuerOfPatientID="HOSP_A"),
                        instance(1, 2, PatientID="P1", IssuerOfPatientID="1.2.3"), **options)
    assert resources.patient["identifier"][0]["system"] == "urn:oid:1.2.3"


def test_instances_with_the_same_patient_id_under_different_resolved_systems_disagree():
    options = {"issuer_systems": {"HOSP_A": "urn:a", "HOSP_B": "urn:b"}}
    with pytest.raises(PatientMismatchError, match="2 different values"):
        convert(instance(1, 1, PatientID="P1", IssuerOfPatientID="HOSP_A"),
                instance(1, 2, PatientID="P1", IssuerOfPatientID="HOSP_B"), **options)
