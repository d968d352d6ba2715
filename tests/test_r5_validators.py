"""The independent R5 validator (tests/r5_validator.py: HL7's R5 JSON schema) works, and R5
output passes it and fhir.resources' R5 models alike."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources import get_fhir_model_class
from pydantic import ValidationError

from mapping import MappingOptions, convert_study, render
from tests.mapping_cases import CT_SMALL, dicomdir_instances, read
from tests.r5_validator import require_r5_schema, validate_r5

DCM = "http://dicom.nema.org/resources/ontology/DCM"


@pytest.fixture(autouse=True)
def _schema() -> None:
    require_r5_schema()


def fhir_resources_r5_errors(resource: dict[str, Any]) -> list[str]:
    """The other validator: fhir.resources' R5 model of the resource type."""
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)[:5]]
    return []


def r5_study() -> dict[str, Any]:
    return {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/p"},
            "modality": [{"coding": [{"system": DCM, "code": "CT"}]}],
            "series": [{"uid": "1.2.3", "modality": {"coding": [{"system": DCM, "code": "CT"}]},
                        "instance": [{"uid": "1.2.3.4", "sopClass": {"system": "urn:ietf:rfc:3986",
                                                                     "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"}}]}]}


def test_a_valid_r5_imaging_study_passes():
    assert validate_r5(r5_study()) == []


def test_an_r4_shaped_imaging_study_fails_modality_as_coding():
    # Real R4 output: ImagingStudy.modality and series.modality are Codings, CodeableConcepts in R5.
    study = convert_study([read(CT_SMALL)]).imaging_study
    errors = validate_r5({**study, "subject": {"reference": "Patient/p"}})
    assert any(e.startswith("ImagingStudy.modality.0:") for e in errors), errors
    assert any(e.startswith("ImagingStudy.series.0.modality:") for e in errors), errors


def test_an_element_r5_removed_fails():
    assert validate_r5({**r5_study(), "interpreter": [{"display": "Dr"}]})  # R5 has no interpreter


def test_an_unknown_resource_type_fails():
    assert validate_r5({"resourceType": "ImagingManifest"}) == ["'ImagingManifest' is not an R5 resource type"]


def test_errors_inside_bundle_entries_and_contained_resources_name_the_element():
    broken = {"resourceType": "Patient", "id": "p", "sex": "F"}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": broken}]}
    assert validate_r5(bundle) == [
        "Bundle.entry[0].Patient: Additional properties are not allowed ('sex' was unexpected)"]
    assert validate_r5({**r5_study(), "contained": [broken]}) == [
        "ImagingStudy.contained[0].Patient: Additional properties are not allowed ('sex' was unexpected)"]


def _resources(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document["resourceType"] == "Bundle":
        return [entry["resource"] for entry in document["entry"]]
    return [document, *document.get("contained", [])]


@pytest.mark.parametrize("shape", ["bundle", "contained"])
def test_dicomdirtests_in_r5_passes_both_validators(shape):
    options = MappingOptions(fhir_version="R5", dicomweb_url="https://pacs.example/dicom-web")
    failures = []
    for uid, instances in dicomdir_instances().items():
        document = render(convert_study(instances, options), shape)
        failures += [f"study {uid}: {e}" for e in validate_r5(document)]
        for resource in _resources(document):
            failures += [f"study {uid} {resource['resourceType']}: {e}" for e in fhir_resources_r5_errors(resource)]
    assert failures == []
