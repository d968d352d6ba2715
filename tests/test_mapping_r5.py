"""FHIR R5 output (mapping/README.md, "R5"): one mapping, rendered as R5 by mapping/r5.py.

Every resource is checked at the tests' edge: valid R5 by fhir.resources' R5 models, and
exactly what those models write for it.
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from mapping import (ConfigurationError, MappingError, MappingOptions, merge_imaging_study, merge_resources,
                     parse_resources, render, to_bundle, to_contained)
from mapping.fhirjson import INSTANCE_ORDER, R5_INSTANCE_ORDER, model_json, validated
from mapping.r5 import imaging_study_r5, resource_r5, study_version
from tests.mapping_cases import (CR_STUDY, CT_SMALL, CT_STUDY, MR_STUDY, code_item, convert, dicomdir_instances,
                                 instance, read)

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
WADO = "https://pacs.example.org/dicom-web"


def r5(resource: dict) -> dict:
    """resource, checked: valid R5 and exactly what the R5 models write for it."""
    assert model_json(validated(resource, "test", "R5")) == resource
    return resource


def convert_r5(*datasets: Dataset, **options):
    return convert(*datasets, fhir_version="R5", **options)


def study_r5(*datasets: Dataset, **options) -> dict:
    return r5(convert_r5(*datasets, **options).imaging_study)


@pytest.fixture(scope="module")
def dicomdir():
    return dicomdir_instances()


def test_the_fhir_version_is_r4_unless_asked():
    assert MappingOptions().fhir_version == "R4"
    assert convert(instance()).fhir_version == "R4"
    assert convert_r5(instance()).fhir_version == "R5"


def test_a_fhir_version_other_than_r4_or_r5_is_refused():
    with pytest.raises(ConfigurationError, match="fhir_version: expected one of R4, R5, got 'R6'"):
        MappingOptions(fhir_version="R6")


def test_study_and_series_modality_are_codeable_concepts(dicomdir):
    study = study_r5(*dicomdir[MR_STUDY])
    assert study["modality"] == [{"coding": [{"system": DCM, "code": "MR"}]}]
    assert {s["modality"]["coding"][0]["code"] for s in study["series"]} == {"MR"}


def test_procedure_code_becomes_procedure_as_a_codeable_reference():
    ds = instance(ProcedureCodeSequence=[code_item("RPID1", "99LOCAL", "CT Chest")])
    study = study_r5(ds)
    assert "procedureCode" not in study
    assert study["procedure"] == [{"concept": {"coding": [
        {"system": "urn:dicom:coding-scheme:99LOCAL", "code": "RPID1", "display": "CT Chest"}]}}]


def test_reason_code_becomes_reason_as_a_codeable_reference():
    study = study_r5(instance(ReasonForTheRequestedProcedure="chest pain"))
    assert "reasonCode" not in study
    assert study["reason"] == [{"concept": {"text": "chest pain"}}]


def test_body_site_becomes_a_codeable_reference(dicomdir):
    sites = [s["bodySite"] for s in study_r5(*dicomdir[CR_STUDY])["series"]]
    assert sites and all(set(site) == {"concept"} and site["concept"]["coding"][0]["system"] == SCT
                         for site in sites)


def test_an_unknown_body_part_keeps_its_term_as_the_concepts_text():
    [series] = study_r5(instance(BodyPartExamined="WRISTBAND"))["series"]
    assert series["bodySite"] == {"concept": {"text": "WRISTBAND"}}


def test_laterality_is_a_codeable_concept():
    [series] = study_r5(instance(Laterality="L"))["series"]
    assert series["laterality"] == {"coding": [{"system": SCT, "code": "7771000", "display": "Left"}]}


def test_the_accession_number_is_a_service_request_in_based_on_and_not_an_identifier():
    study = study_r5(instance(AccessionNumber="A-17"), accession_system="http://hospital.example/acsn")
    assert [i["system"] for i in study["identifier"]] == ["urn:dicom:uid"]
    assert study["basedOn"] == [{"type": "ServiceRequest", "identifier": {
        "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
        "system": "http://hospital.example/acsn", "value": "A-17"}}]


def test_an_accession_already_in_based_on_is_not_referenced_twice():
    acsn = {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": "http://h.example/acsn", "value": "A1"}
    r4 = {"resourceType": "ImagingStudy", "status": "available", "subject": {"display": "x"},
          "identifier": [acsn], "basedOn": [{"type": "ServiceRequest",
                                             "identifier": {"system": "http://h.example/acsn", "value": "A1"}}]}
    study = r5(imaging_study_r5(r4))
    assert "identifier" not in study and study["basedOn"] == r4["basedOn"]


def test_there_is_no_interpreter_in_r5():
    ds = instance(NameOfPhysiciansReadingStudy=["Reader^Rita"])
    assert "interpreter" in convert(ds).imaging_study
    assert "interpreter" not in study_r5(ds)


def test_the_endpoint_has_a_list_of_connection_types_and_one_payload():
    endpoint = r5(convert_r5(instance(), dicomweb_url=WADO).endpoints[0])
    assert endpoint["connectionType"] == [{"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"}]}]
    assert endpoint["payload"] == [{"type": [{"coding": [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "113014", "display": "DICOM"}],
        "text": "DICOM WADO-RS"}], "mimeType": ["application/dicom"]}]
    assert "payloadType" not in endpoint and "payloadMimeType" not in endpoint


def test_the_patient_is_the_same_in_r5():
    ds = read(CT_SMALL)
    assert r5(convert_r5(ds).patient) == convert(ds).patient


def test_every_dicomdir_study_validates_as_r5_and_round_trips_through_the_r5_models(dicomdir):
    for datasets in dicomdir.values():
        resources = convert_r5(*datasets, dicomweb_url=WADO)
        for resource in (resources.patient, resources.imaging_study, *resources.endpoints):
            r5(resource)


def test_the_r4_elements_other_parts_of_the_mapping_add_are_rendered_as_r5():
    # basedOn from RequestAttributesSequence, series.performer, series.endpoint and the DCM
    # payload coding: hand-built R4, in the forms the R4 definitions give them.
    operator = {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRF"}
    r4 = {"resourceType": "ImagingStudy", "status": "available",
          "subject": {"reference": "urn:uuid:5c4b5e4e-0000-5000-8000-000000000001"},
          "basedOn": [{"type": "ServiceRequest", "identifier": {"value": "RP-1"}}],
          "reasonCode": [{"coding": [{"system": SCT, "code": "29857009", "display": "Chest pain"}]}],
          "reasonReference": [{"reference": "Condition/c1"}],
          "procedureReference": {"reference": "Procedure/p1"},
          "series": [{"uid": "1.2.3.1", "modality": {"system": DCM, "code": "CT"},
                      "endpoint": [{"reference": "Endpoint/e1"}],
                      "performer": [{"function": {"coding": [operator]}, "actor": {"display": "Op O"}}]}]}
    validated(r4, "R4 input")
    study = r5(imaging_study_r5(r4))
    assert study["basedOn"] == r4["basedOn"]
    assert study["reason"] == [{"concept": r4["reasonCode"][0]}, {"reference": {"reference": "Condition/c1"}}]
    assert study["procedure"] == [{"reference": {"reference": "Procedure/p1"}}]
    assert study["series"][0]["performer"] == r4["series"][0]["performer"]
    assert study["series"][0]["endpoint"] == [{"reference": "Endpoint/e1"}]
    endpoint = r5(resource_r5({"resourceType": "Endpoint", "status": "active", "address": WADO,
                               "connectionType": {"code": "dicom-wado-rs"},
                               "payloadType": [{"coding": [{"system": DCM, "code": "113014", "display": "DICOM"}],
                                                "text": "DICOM WADO-RS"}]}))
    assert endpoint["payload"][0]["type"][0]["coding"][0]["code"] == "113014"


def test_instances_are_the_same_in_r4_and_r5():
    assert dict(INSTANCE_ORDER) == dict(R5_INSTANCE_ORDER)  # why series_r5 leaves them as they are


def test_rendering_r5_again_changes_nothing(dicomdir):
    resources = convert_r5(*dicomdir[CT_STUDY], dicomweb_url=WADO)
    for resource in (resources.patient, resources.imaging_study, *resources.endpoints):
        assert resource_r5(resource) == resource


def test_the_release_of_a_study_is_told_by_its_forms():
    assert study_version(convert(instance()).imaging_study) == "R4"
    assert study_version(convert_r5(instance()).imaging_study) == "R5"
    assert study_version({"resourceType": "ImagingStudy"}) is None


@pytest.mark.parametrize("shape", ["bundle", "contained"])
def test_both_shapes_are_valid_r5_and_parse_back(shape, dicomdir):
    resources = convert_r5(*dicomdir[CT_STUDY], dicomweb_url=WADO)
    document = render(resources, shape)
    model = (to_bundle if shape == "bundle" else to_contained)(resources)
    assert model_json(model) == document
    assert model.__class__.__module__.startswith("fhir.resources.") and ".R4B." not in model.__class__.__module__
    parsed = parse_resources(document)
    assert parsed.fhir_version == "R5"
    assert render(parsed, shape) == document


def test_an_r4_document_read_for_r5_becomes_r5():
    document = render(convert(instance(AccessionNumber="A1"), dicomweb_url=WADO))
    parsed = parse_resources(document, "R5")
    assert parsed.fhir_version == "R5"
    assert render(parsed) == render(convert_r5(instance(AccessionNumber="A1"), dicomweb_url=WADO))


def test_an_r5_document_is_never_read_as_r4():
    with pytest.raises(MappingError, match="cannot turn FHIR R5 resources into R4"):
        parse_resources(render(convert_r5(instance())), "R4")


def test_a_merge_of_r5_parts_keeps_both_parts():
    first = convert_r5(instance(1, 1, AccessionNumber="A1", Modality="MR"), dicomweb_url=WADO)
    second = convert_r5(instance(2, 1, AccessionNumber="A1", Modality="CT"), dicomweb_url=WADO)
    merged = merge_resources(first, second)
    study = r5(merged.imaging_study)
    assert [s["uid"] for s in study["series"]] == [f"{instance().StudyInstanceUID}.1",
                                                   f"{instance().StudyInstanceUID}.2"]
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (2, 2)
    assert [m["coding"][0]["code"] for m in study["modality"]] == ["MR", "CT"]
    assert len(study["basedOn"]) == 1 and len(study["endpoint"]) == 1
    assert merged.fhir_version == "R5"
    assert render(merged) == render(convert_r5(instance(1, 1, AccessionNumber="A1", Modality="MR"),
                                               instance(2, 1, AccessionNumber="A1", Modality="CT"),
                                               dicomweb_url=WADO))


def test_resending_an_r5_study_changes_nothing(dicomdir):
    whole = convert_r5(*dicomdir[CT_STUDY], dicomweb_url=WADO)
    assert render(merge_resources(whole, whole)) == render(whole)
    assert merge_imaging_study(whole.imaging_study, whole.imaging_study) == whole.imaging_study


def test_an_r4_study_merged_with_an_r5_part_becomes_r5():
    merged = merge_imaging_study(convert(instance(1, 1)).imaging_study, convert_r5(instance(2, 1)).imaging_study)
    assert r5(merged) == convert_r5(instance(1, 1), instance(2, 1)).imaging_study


def test_an_r4_part_is_never_merged_into_an_r5_study():
    with pytest.raises(MappingError, match="cannot merge an R4 part into an R5 ImagingStudy"):
        merge_imaging_study(convert_r5(instance(1, 1)).imaging_study, convert(instance(2, 1)).imaging_study)
