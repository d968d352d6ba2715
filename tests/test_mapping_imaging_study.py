"""ImagingStudy (mapping/README.md, "ImagingStudy"), with real studies from pydicom's test data."""

from __future__ import annotations

import json
import random

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy

from mapping import (InstanceHeader, MappingError, MultipleStudiesError, PatientMismatchError, convert_datasets,
                     convert_study, render)
from tests.mapping_cases import (CR_STUDY, CT_STUDY, MR_STUDY, SR_FILE, STUDY, as_json, code_item, convert,
                                 dicomdir_instances, instance, read, reread, study_of)

# Several cases set invalid values on purpose; pydicom warns about them when they are set.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning",
                                        "ignore:The value length:UserWarning")

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"


@pytest.fixture(scope="module")
def dicomdir():
    return dicomdir_instances()


def test_status_is_available():
    assert study_of(instance())["status"] == "available"


def test_counts_are_integers_of_what_the_resource_holds(dicomdir):
    study = study_of(*dicomdir[CT_STUDY])
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (2, 7)
    assert sorted(s["numberOfInstances"] for s in study["series"]) == [2, 5]
    assert all(isinstance(s["number"], int) for s in study["series"])
    assert all(isinstance(i["number"], int) for s in study["series"] for i in s["instance"])


def test_the_mr_study_holds_its_three_series(dicomdir):
    study = study_of(*dicomdir[MR_STUDY])
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (3, 11)
    assert sorted(len(s["instance"]) for s in study["series"]) == [1, 3, 7]
    assert study["modality"] == [{"system": DCM, "code": "MR"}]


def test_every_dicomdir_study_validates_and_round_trips_through_the_r4b_models(dicomdir):
    for datasets in dicomdir.values():
        resources = convert_study(datasets)
        for shape in ("bundle", "contained"):
            document = render(resources, shape)
            model = ImagingStudy if shape == "contained" else Bundle
            assert json.loads(model.model_validate(document).model_dump_json(exclude_none=True)) == document


def test_modality_is_the_union_of_series_modalities_in_first_seen_order_not_modalities_in_study():
    study = study_of(instance(1, Modality="MR", ModalitiesInStudy=["MR"]), instance(2, Modality="CT"),
                     instance(3, Modality="MR"), instance(4, Modality="SR"))
    assert [m["code"] for m in study["modality"]] == ["MR", "CT", "SR"]


def test_a_series_without_modality_gets_ot_with_a_warning():
    resources = convert(instance(Modality=None))
    assert resources.imaging_study["series"][0]["modality"]["code"] == "OT"
    assert any("Modality (0008,0060)" in w for w in resources.warnings)


def test_subject_refers_to_the_patient_and_carries_its_identifier():
    resources = convert(instance(PatientID="P-5"))
    subject = as_json(resources.imaging_study)["subject"]
    assert subject["reference"].startswith("urn:uuid:")
    assert subject["identifier"]["value"] == "P-5"


def test_description_is_the_study_description():
    assert study_of(instance(StudyDescription="CT Thorax"))["description"] == "CT Thorax"


def test_referrer_is_a_display_only_formatted_name():
    assert study_of(instance(ReferringPhysicianName="Welby^Marcus^^Dr."))["referrer"] == {"display": "Dr. Marcus Welby"}


def test_interpreters_are_display_only_references():
    study = study_of(reread(instance(NameOfPhysiciansReadingStudy=["House^Gregory", "Grey^Meredith"])))
    assert study["interpreter"] == [{"display": "Gregory House"}, {"display": "Meredith Grey"}]


def test_procedure_codes_one_concept_per_item_with_the_designator_system():
    study = study_of(reread(instance(ProcedureCodeSequence=[
        code_item("169069000", "SCT", "CT of chest"), code_item("24627-2", "LN", "CT Chest"),
        code_item("CTCHEST1", "99HOSP", "CT chest local")])))
    assert study["procedureCode"] == [
        {"coding": [{"system": SCT, "code": "169069000", "display": "CT of chest"}]},
        {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        {"coding": [{"system": "urn:dicom:coding-scheme:99HOSP", "code": "CTCHEST1", "display": "CT chest local"}]},
    ]


def test_reason_codes_from_the_reason_sequence():
    study = study_of(instance(ReasonForRequestedProcedureCodeSequence=[code_item("R07.4", "ICD10", "Chest pain")],
                              ReasonForTheRequestedProcedure="chest pain"))
    assert study["reasonCode"] == [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "R07.4",
                                                "display": "Chest pain"}]}]


def test_reason_text_when_there_are_no_reason_codes():
    assert study_of(instance(ReasonForTheRequestedProcedure="chest pain"))["reasonCode"] == [{"text": "chest pain"}]


def test_location_is_a_display_only_reference_to_institution_and_department():
    study = study_of(instance(InstitutionName="General Hospital", InstitutionalDepartmentName="Radiology"))
    assert study["location"] == {"display": "General Hospital, Radiology"}
    assert "location" not in study_of(instance())


def test_endpoint_is_referenced_only_when_a_dicomweb_url_is_configured():
    assert "endpoint" not in study_of(instance())
    resources = convert(instance(), dicomweb_url="https://pacs.example.org/dicom-web")
    [reference] = as_json(resources.imaging_study)["endpoint"]
    assert reference["reference"].startswith("urn:uuid:") and len(resources.endpoints) == 1


def test_series_uid_number_description_and_count():
    [series] = study_of(instance(7, 1, SeriesDescription="Axial 5mm"), instance(7, 2))["series"]
    assert (series["uid"], series["number"], series["description"], series["numberOfInstances"]) == (
        f"{STUDY}.7", 7, "Axial 5mm", 2)


def test_series_body_site_is_the_snomed_code_of_the_body_part(dicomdir):
    sites = [s["bodySite"] for s in study_of(*dicomdir[CR_STUDY])["series"]]  # BodyPartExamined CSPINE
    assert sites and all(site == {"system": SCT, "code": "122494005", "display": "Cervical spine"} for site in sites)
    assert study_of(instance(BodyPartExamined="CHEST"))["series"][0]["bodySite"] == {
        "system": SCT, "code": "43799004", "display": "Chest"}


def test_an_unknown_body_part_is_a_coding_with_display_only():
    assert study_of(instance(BodyPartExamined="LEFTTHING"))["series"][0]["bodySite"] == {"display": "LEFTTHING"}


@pytest.mark.parametrize("values,code", [({"Laterality": "R"}, "24028007"), ({"ImageLaterality": "L"}, "7771000"),
                                         ({"Laterality": "B", "ImageLaterality": "L"}, "51440002"),
                                         ({"ImageLaterality": "U"}, "66459002")])
def test_series_laterality_from_laterality_else_image_laterality(values, code):
    laterality = study_of(instance(**values))["series"][0]["laterality"]
    assert (laterality["system"], laterality["code"]) == (SCT, code)


@pytest.mark.parametrize("keyword,tag", [("Laterality", "(0020,0060)"), ("ImageLaterality", "(0020,0062)")])
def test_another_laterality_value_is_omitted_with_a_warning_naming_its_element(keyword, tag):
    resources = convert(instance(**{keyword: "X"}))
    assert "laterality" not in resources.imaging_study["series"][0]
    assert [w for w in resources.warnings if "aterality" in w] == [f"{keyword} {tag}: not one of R, L, B, U, omitted"]


def test_instance_uid_number_and_sop_class():
    [item] = study_of(instance(1, 12))["series"][0]["instance"]
    assert (item["uid"], item["number"], item["sopClass"]["code"]) == (f"{STUDY}.1.12", 12,
                                                                       "urn:oid:1.2.840.10008.5.1.4.1.1.2")


def test_sr_instance_title_is_the_concept_name_meaning():
    [item] = study_of(read(SR_FILE))["series"][0]["instance"]
    assert item["title"] == "Diagnosis"


def test_document_instance_title_is_the_document_title():
    [item] = study_of(instance(DocumentTitle="Referral letter", ImageType=None))["series"][0]["instance"]
    assert item["title"] == "Referral letter"


def test_a_documents_title_is_its_document_title_not_its_coded_concept_name():
    ds = instance(DocumentTitle="Referral letter", ConceptNameCodeSequence=[code_item("11488-4", "LN", "Consult note")],
                  SOPClassUID="1.2.840.10008.5.1.4.1.1.104.1", ImageType=None)  # Encapsulated PDF Storage
    [item] = study_of(reread(ds))["series"][0]["instance"]
    assert item["title"] == "Referral letter"


def test_image_instance_title_is_image_type_joined_with_backslash():
    [item] = study_of(reread(instance(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])))["series"][0]["instance"]
    assert item["title"] == "ORIGINAL\\PRIMARY\\AXIAL"


def test_series_and_instances_are_ordered_by_number_then_uid_whatever_the_input_order():
    datasets = [instance(s, n) for s in (3, 1, 2, 10) for n in (2, 10, 1)] + [instance(1, None)]
    shuffled = datasets[:]
    random.Random(4).shuffle(shuffled)
    study = study_of(*shuffled)
    assert [s["number"] for s in study["series"]] == [1, 2, 3, 10]
    assert [i.get("number") for i in study["series"][0]["instance"]] == [1, 2, 10, None]
    assert render(convert(*shuffled)) == render(convert(*datasets))


def test_conversion_is_deterministic_byte_for_byte(dicomdir):
    first = json.dumps(render(convert_study(dicomdir[CT_STUDY])))
    assert json.dumps(render(convert_study(list(reversed(dicomdir[CT_STUDY]))))) == first


def test_a_repeated_sop_instance_uid_counts_once_and_the_last_wins():
    study = study_of(instance(1, 1, SeriesDescription="old"), instance(1, 2),
                     instance(1, 1, sop=f"{STUDY}.1.1", SeriesDescription="new", InstanceNumber=5))
    assert study["numberOfInstances"] == 2
    assert [i["number"] for i in study["series"][0]["instance"]] == [2, 5]


def test_two_studies_are_refused_by_convert_study_naming_both():
    with pytest.raises(MultipleStudiesError) as info:
        convert_study([instance(study="1.2.3"), instance(study="1.2.4")])
    assert "1.2.3" in str(info.value) and "1.2.4" in str(info.value)


def test_convert_datasets_groups_studies_in_first_seen_order():
    result = convert_datasets([instance(study="1.2.4"), instance(study="1.2.3"), instance(2, study="1.2.4")])
    assert list(result) == ["1.2.4", "1.2.3"]
    assert result["1.2.4"].imaging_study["numberOfSeries"] == 2


def test_instances_disagreeing_on_patient_id_are_refused_without_quoting_the_ids():
    with pytest.raises(PatientMismatchError) as info:
        convert_study([instance(1, 1, PatientID="PAT-AAA"), instance(1, 2, PatientID="PAT-BBB")])
    assert "PAT-AAA" not in str(info.value) and "PAT-BBB" not in str(info.value)
    assert STUDY in str(info.value)


def test_no_instances_is_a_mapping_error():
    with pytest.raises(MappingError):
        convert_study([])


def test_headers_and_datasets_convert_alike():
    datasets = [instance(1, 1), instance(1, 2)]
    headers = [InstanceHeader.from_dataset(d) for d in datasets]
    assert render(convert_study(headers)) == render(convert_study(datasets))


def test_a_negative_instance_number_is_omitted_with_a_warning():
    resources = convert(instance(1, -3, sop=f"{STUDY}.1.3"))
    assert "number" not in resources.imaging_study["series"][0]["instance"][0]
    assert any("InstanceNumber (0020,0013)" in w for w in resources.warnings)


def test_warnings_are_de_duplicated_across_instances():
    resources = convert(*[instance(1, n, PatientSex="X") for n in range(1, 6)])
    assert len([w for w in resources.warnings if "PatientSex" in w]) == 1


def test_a_code_item_without_code_value_keeps_its_meaning_as_text():
    item = code_item("x", "DCM", "Chest CT")
    del item.CodeValue
    assert study_of(instance(ProcedureCodeSequence=[item]))["procedureCode"] == [{"text": "Chest CT"}]
