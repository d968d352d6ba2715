"""The test FHIR engine is a real, validating peer: what it accepts and refuses.

These tests pin the engine's behaviour the delivery tests rely on; a regression
here (say, validation silently off) would make every delivery test meaningless.
"""

from __future__ import annotations

import pytest
import requests

from tests.fhir_engine import FhirEngine, fhir_engine, fhir_engine_process  # noqa: F401 (fixtures)

pytestmark = pytest.mark.interop

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def post(engine: FhirEngine, path: str, body: dict, **headers: str) -> requests.Response:
    return requests.post(f"{engine.base_url}/{path}", json=body, headers=FHIR_JSON | headers, timeout=30)


def test_a_code_outside_a_required_value_set_is_rejected_naming_the_element(fhir_engine):
    response = post(fhir_engine, "Patient", {"resourceType": "Patient", "gender": "M"})
    assert response.status_code == 400
    issue = response.json()["issue"][0]
    assert issue["expression"] == ["Patient.gender"] and "administrative-gender" in issue["details"]["text"]


def test_an_unknown_element_is_rejected(fhir_engine):
    response = post(fhir_engine, "ImagingStudy", {"resourceType": "ImagingStudy", "status": "available",
                                                  "subject": {"display": "x"}, "numberOfFrames": 3})
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["ImagingStudy.numberOfFrames"]


def test_a_missing_required_element_is_rejected(fhir_engine):
    response = post(fhir_engine, "ImagingStudy", {"resourceType": "ImagingStudy", "status": "available"})
    assert response.status_code == 400  # subject is 1..1


def test_a_coding_outside_a_required_value_set_is_rejected(fhir_engine):
    endpoint = {"resourceType": "Endpoint", "status": "active", "address": "http://pacs/dicomweb",
                "payloadType": [{"text": "DICOM WADO-RS"}],
                "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                                   "code": "wado-rs"}}
    assert post(fhir_engine, "Endpoint", endpoint).status_code == 400
    endpoint["connectionType"]["code"] = "dicom-wado-rs"
    assert post(fhir_engine, "Endpoint", endpoint).status_code == 201


def test_a_transaction_is_all_or_nothing(fhir_engine):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0c2a0b8e-5a7f-4c53-9a42-1d3c2b1e0f01",
         "resource": {"resourceType": "Patient", "gender": "female"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "id": "nope", "gender": "male"},
         "request": {"method": "PUT", "url": "Patient/nope", "ifMatch": 'W/"1"'}}]}
    assert post(fhir_engine, "", bundle).status_code == 404  # nothing to match the If-Match against
    assert fhir_engine.resources("Patient") == []


def test_a_stale_if_match_is_refused_with_412(fhir_engine):
    created = post(fhir_engine, "Patient", {"resourceType": "Patient", "gender": "other"}).json()
    url = f"{fhir_engine.base_url}/Patient/{created['id']}"
    stale = requests.put(url, json=created | {"gender": "male"}, headers=FHIR_JSON | {"If-Match": 'W/"old"'},
                         timeout=30)
    assert stale.status_code == 412
    fresh = requests.put(url, json=created | {"gender": "male"},
                         headers=FHIR_JSON | {"If-Match": f'W/"{created["meta"]["versionId"]}"'}, timeout=30)
    assert fresh.status_code == 200 and fresh.headers["ETag"] != f'W/"{created["meta"]["versionId"]}"'


def test_conditional_create_finds_instead_of_duplicating(fhir_engine):
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "7"}]}
    first = post(fhir_engine, "Patient", patient, **{"If-None-Exist": "identifier=urn:mrn|7"})
    second = post(fhir_engine, "Patient", patient, **{"If-None-Exist": "identifier=urn:mrn|7"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert len(fhir_engine.resources("Patient")) == 1


def test_bearer_authentication_is_enforced(fhir_engine):
    fhir_engine.set_auth("bearer", token="s3cret")
    url = f"{fhir_engine.base_url}/Patient"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer s3cret"}, timeout=30).status_code == 200


def test_oauth2_tokens_are_issued_to_known_clients_and_expire(fhir_engine):
    fhir_engine.set_auth("oauth2", clientId="node", clientSecret="pw", tokenLifetime=1)
    assert requests.post(fhir_engine.token_url, auth=("node", "bad"), data={"grant_type": "client_credentials"},
                         timeout=30).status_code == 401
    token = requests.post(fhir_engine.token_url, auth=("node", "pw"), data={"grant_type": "client_credentials"},
                          timeout=30).json()
    assert token["token_type"] == "Bearer" and token["expires_in"] == 1
    url, headers = f"{fhir_engine.base_url}/Patient", {"Authorization": f"Bearer {token['access_token']}"}
    assert requests.get(url, headers=headers, timeout=30).status_code == 200
    fhir_engine.revoke_tokens()
    assert requests.get(url, headers=headers, timeout=30).status_code == 401


def test_faults_hit_the_next_requests_only(fhir_engine):
    fhir_engine.fault(count=2, status=429, retry_after=7)
    url = f"{fhir_engine.base_url}/Patient"
    answers = [requests.get(url, timeout=30) for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 429, 200]
    assert answers[0].headers["Retry-After"] == "7"
    assert fhir_engine.stats()["requests"] == 3


def test_what_the_specification_forbids_but_medplum_lets_through_is_refused_too(fhir_engine):
    base = {"resourceType": "ImagingStudy", "status": "available", "subject": {"display": "x"}}
    refused = {
        "started": {"started": "2005-09-06T10:15:00"},  # a time needs a zone
        "description": {"description": ""},  # empty string
        "identifier": {"identifier": []},  # empty array
        "modality[0]": {"modality": [{"system": "DCM", "code": "CT"}]},  # not an absolute URI
    }
    for where, patch in refused.items():
        response = post(fhir_engine, "ImagingStudy", base | patch)
        assert response.status_code == 400, where
        assert response.json()["issue"][0]["expression"] == [f"ImagingStudy.{where}"]
    assert post(fhir_engine, "ImagingStudy", base | {"started": "2005-09-06T10:15:00.5-05:00"}).status_code == 201


def test_the_engine_accepts_every_r4_resource_with_the_elements_of_the_full_mapping(fhir_engine):
    # basedOn (accession, placer and filler order numbers), series.performer, request reasons,
    # an Endpoint with the DICOM payload code on the study and every series, MADO's number of frames,
    # a fraction kept as given.
    from pydicom.sequence import Sequence

    from mapping import convert_study, merge_resources, render
    from mapping.options import MappingOptions
    from tests.mapping_cases import CT_SMALL, code_item, read
    from tests.test_mapping_based_on import issuer, request

    ds = read(CT_SMALL)
    ds.StudyTime, ds.SeriesTime = "141516.123", "141516.1"
    ds.AccessionNumber, ds.NumberOfFrames = "A-1", 2
    ds.PerformingPhysicianName, ds.OperatorsName = "Smith^John^^Dr", ["Miller^Eve", "Doe^Ann"]
    ds.RequestAttributesSequence = Sequence([request(
        AccessionNumber="A-2", IssuerOfAccessionNumberSequence=issuer(UniversalEntityID="1.2.3", UniversalEntityIDType="ISO"),
        PlacerOrderNumberImagingServiceRequest="P-7", FillerOrderNumberImagingServiceRequest="F-9",
        ReasonForRequestedProcedureCodeSequence=Sequence([code_item("R51", "I10", "Headache")]))])
    first = convert_study([ds], MappingOptions(patient_identifier_system="urn:mrn", dicomweb_url="https://pacs/dicom-web"))
    again = convert_study([ds], MappingOptions(patient_identifier_system="urn:mrn", dicomweb_url="https://vna/wado"))
    resources = merge_resources(first, again)
    study = resources.imaging_study
    assert {"basedOn", "reasonCode"} <= set(study) and len(resources.endpoints) == 2
    assert {"performer", "endpoint"} <= set(study["series"][0]) and "extension" in study["series"][0]["instance"][0]

    response = post(fhir_engine, "", render(resources, "bundle"))
    assert response.status_code == 200, response.text
    assert post(fhir_engine, "ImagingStudy", render(resources, "contained")).status_code == 201
    [stored] = [s for s in fhir_engine.resources("ImagingStudy") if "contained" not in s]
    assert stored["started"].startswith("2004-01-19T14:15:16.123") and len(stored["endpoint"]) == 2
