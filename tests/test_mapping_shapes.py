"""Output shapes (mapping/README.md, "Output shapes") and parse_resources, their inverse."""

from __future__ import annotations

import json

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy

from mapping import MappingError, parse_resources, render, to_bundle, to_contained
from tests.mapping_cases import CT_SMALL, STUDY, convert, instance, read

WADO = "https://pacs.example.org/dicom-web"


def entries(document):
    return {e["resource"]["resourceType"]: e for e in document["entry"]}


def test_bundle_is_a_transaction_of_conditional_creates():
    document = render(convert(instance(), dicomweb_url=WADO), "bundle")
    assert (document["resourceType"], document["type"]) == ("Bundle", "transaction")
    assert [e["resource"]["resourceType"] for e in document["entry"]] == ["Patient", "Endpoint", "ImagingStudy"]
    assert all(e["request"]["method"] == "POST" and e["request"]["ifNoneExist"] for e in document["entry"])


def test_patient_is_created_only_if_no_patient_has_its_identifier():
    patient = entries(render(convert(instance(PatientID="P-1"), patient_identifier_system="urn:oid:1.2.3")))["Patient"]
    assert patient["request"] == {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:oid:1.2.3|P-1"}


def test_patient_condition_without_system_matches_only_identifiers_without_a_system():
    # identifier=P-1 alone would match P-1 under any issuer's system: another patient.
    patient = entries(render(convert(instance(PatientID="P-1"))))["Patient"]
    assert patient["request"]["ifNoneExist"] == "identifier=|P-1"


def test_search_special_characters_in_a_patient_id_are_escaped():
    patient = entries(render(convert(instance(PatientID="A|B,C&D"))))["Patient"]
    assert patient["request"]["ifNoneExist"] == "identifier=|A%5C%7CB%5C%2CC%26D"


def test_imaging_study_is_created_only_if_its_study_uid_is_new():
    study = entries(render(convert(instance())))["ImagingStudy"]
    assert study["request"] == {"method": "POST", "url": "ImagingStudy",
                                "ifNoneExist": f"identifier=urn:dicom:uid|urn:oid:{STUDY}"}


def test_imaging_study_refers_to_patient_and_endpoint_by_their_full_urls():
    found = entries(render(convert(instance(), dicomweb_url=WADO)))
    study = found["ImagingStudy"]["resource"]
    assert study["subject"]["reference"] == found["Patient"]["fullUrl"]
    assert [e["reference"] for e in study["endpoint"]] == [found["Endpoint"]["fullUrl"]]
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in found.values())


def test_endpoint_resource_and_its_conditional_create():
    endpoint = entries(render(convert(instance(), dicomweb_url=WADO + "/studies")))["Endpoint"]
    resource = endpoint["resource"]
    assert resource["status"] == "active" and resource["address"] == WADO
    assert resource["connectionType"] == {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                                          "code": "dicom-wado-rs"}
    assert resource["payloadType"][0]["text"] == "DICOM WADO-RS"
    assert resource["payloadMimeType"] == ["application/dicom"]
    assert resource["name"] == f"DICOM WADO-RS endpoint {WADO}"
    assert endpoint["request"]["ifNoneExist"] == f"identifier=urn:ietf:rfc:3986|{WADO}"


def test_full_urls_are_deterministic():
    first = json.dumps(render(convert(instance(), dicomweb_url=WADO)))
    assert json.dumps(render(convert(instance(), dicomweb_url=WADO))) == first


@pytest.mark.parametrize("shape", ["bundle", "contained"])
def test_without_patient_id_the_patient_is_contained_never_an_entry(shape):
    document = render(convert(instance(PatientID=None)), shape)
    study = entries(document)["ImagingStudy"]["resource"] if shape == "bundle" else document
    if shape == "bundle":
        assert [e["resource"]["resourceType"] for e in document["entry"]] == ["ImagingStudy"]
    [patient] = study["contained"]
    assert patient["resourceType"] == "Patient" and "identifier" not in patient
    assert study["subject"] == {"reference": f"#{patient['id']}"}


def test_contained_shape_holds_patient_and_endpoint():
    study = render(convert(instance(PatientID="P-1"), dicomweb_url=WADO), "contained")
    patient, endpoint = study["contained"]
    assert study["subject"]["reference"] == f"#{patient['id']}"
    assert [e["reference"] for e in study["endpoint"]] == [f"#{endpoint['id']}"]
    assert [e["reference"] for e in study["series"][0]["endpoint"]] == [f"#{endpoint['id']}"]
    assert endpoint["address"] == WADO


def test_models_of_both_shapes_validate():
    resources = convert(read(CT_SMALL), dicomweb_url=WADO)
    assert isinstance(to_bundle(resources), Bundle) and isinstance(to_contained(resources), ImagingStudy)
    assert json.loads(to_bundle(resources).model_dump_json(exclude_none=True)) == render(resources, "bundle")


@pytest.mark.parametrize("shape", ["bundle", "contained"])
@pytest.mark.parametrize("options", [{}, {"dicomweb_url": WADO}])
@pytest.mark.parametrize("patient_id", ["P-1", None])
def test_parse_resources_inverts_render(shape, options, patient_id):
    document = render(convert(instance(PatientID=patient_id), **options), shape)
    parsed = parse_resources(json.loads(json.dumps(document)))
    assert parsed.study_uid == STUDY
    assert render(parsed, shape) == document


@pytest.mark.parametrize("document", [{"resourceType": "Patient"}, {"resourceType": "Bundle", "entry": []},
                                      {"resourceType": "ImagingStudy", "status": "available",
                                       "subject": {"reference": "Patient/1"}}, [], "text"])
def test_parse_resources_refuses_other_documents(document):
    with pytest.raises(MappingError):
        parse_resources(document)


def _study(document):
    return document["entry"][-1]["resource"]


@pytest.mark.parametrize("damage", [
    lambda d: _study(d).update(series={"uid": "1"}),
    lambda d: _study(d)["series"][0]["instance"][0].pop("uid"),
    lambda d: _study(d)["series"][0]["instance"][0].update(number="7"),
    lambda d: _study(d)["series"][0].update(number=True),
    lambda d: _study(d).update(identifier=[_study(d)["identifier"][0], "A-1"]),
    lambda d: _study(d).update(started=20050906),
    lambda d: d["entry"][0]["resource"]["identifier"][0].update(value=17),
    lambda d: d["entry"][1]["resource"].pop("address"),
], ids=["series-not-a-list", "instance-without-uid", "number-as-text", "number-as-boolean",
        "identifier-not-an-object", "started-not-text", "patient-id-not-text", "endpoint-without-address"])
def test_parse_resources_refuses_a_document_not_structured_as_a_study_this_tool_wrote(damage):
    document = json.loads(json.dumps(render(convert(instance(PatientID="P-1"), dicomweb_url=WADO))))
    damage(document)
    with pytest.raises(MappingError):
        parse_resources(document)


def test_parse_resources_leaves_checking_values_to_the_edge():
    document = render(convert(instance(PatientID="P-1")))
    document["entry"][0]["resource"]["birthDate"] = "31.01.1970"
    assert parse_resources(document).patient["birthDate"] == "31.01.1970"


def test_an_unknown_shape_is_a_value_error():
    with pytest.raises(ValueError, match="shape"):
        render(convert(instance()), "ndjson")
