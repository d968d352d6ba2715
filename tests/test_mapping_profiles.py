"""What the imaging profiles ask of the R4 output with a DICOMweb URL (README.md, "Conformance to
the imaging profiles"; mapping/README.md, "Endpoint"): IHE MADO, IHE IMR, SMART Imaging Access;
and endpoints as a union over a study's parts and re-conversions."""

from __future__ import annotations

import json

import pytest
from pydicom.data import get_testdata_file

from mapping import merge_resources, parse_resources, render
from tests.mapping_cases import CT_STUDY, as_json, convert, dicomdir_instances, instance, read

WADO = "https://pacs.example.org/dicom-web"
OTHER = "https://archive.example.org/wado"
MADO_FRAMES = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoNumberOfFrames"
DCM_PAYLOAD = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "113014", "display": "DICOM"}


def addresses(resources) -> list[str]:
    return [e["address"] for e in resources.endpoints]


def test_the_study_and_every_series_refer_to_the_endpoint():  # IHE MADO
    study = as_json(convert(*dicomdir_instances()[CT_STUDY], dicomweb_url=WADO).imaging_study)
    assert len(study["series"]) == 2
    assert all(s["endpoint"] == study["endpoint"] for s in study["series"])


def test_the_payload_type_carries_the_dicom_code_besides_the_text():  # IHE IMR
    [endpoint] = convert(instance(), dicomweb_url=WADO).endpoints
    assert endpoint["payloadType"] == [{"coding": [DCM_PAYLOAD], "text": "DICOM WADO-RS"}]
    as_json(endpoint)


@pytest.mark.parametrize("configured", [WADO, WADO + "/", WADO + "/studies", WADO + "/studies/"])
def test_the_address_is_the_wado_rs_base_url(configured):  # SMART Imaging Access: base + /studies/{uid}
    assert addresses(convert(instance(), dicomweb_url=configured)) == [WADO]


def test_a_multi_frame_instance_carries_its_number_of_frames_in_the_mado_extension():
    # R4 has no element for it; IHE MADO 1.0.0 publishes an extension (mapping/README.md).
    ds = read(get_testdata_file("examples_ybr_color.dcm"))  # a real multi-frame US: 30 frames
    [instance_json] = as_json(convert(ds).imaging_study)["series"][0]["instance"]
    assert instance_json["extension"] == [{"url": MADO_FRAMES, "valueInteger": 30}]


def test_a_single_frame_instance_without_number_of_frames_has_no_extension():
    [instance_json] = convert(instance()).imaging_study["series"][0]["instance"]
    assert "extension" not in instance_json


def test_a_reconversion_with_another_dicomweb_url_keeps_the_first_endpoint_and_adds_the_second():
    first, again = convert(instance(), dicomweb_url=WADO), convert(instance(), dicomweb_url=OTHER)
    merged = merge_resources(first, again)
    assert addresses(merged) == [WADO, OTHER]
    urls = {e["fullUrl"] for e in render(merged)["entry"] if e["resource"]["resourceType"] == "Endpoint"}
    assert {e["reference"] for e in merged.imaging_study["endpoint"]} == urls
    assert {e["reference"] for e in merged.imaging_study["series"][0]["endpoint"]} == urls


def test_a_part_without_dicomweb_url_keeps_the_endpoints_and_resending_changes_nothing():
    merged = merge_resources(convert(instance(1, 1), dicomweb_url=WADO), convert(instance(2, 1)))
    assert addresses(merged) == [WADO]
    assert merge_resources(merged, convert(instance(1, 1), dicomweb_url=WADO)) == merged


def test_a_second_part_with_the_same_url_adds_no_endpoint():
    merged = merge_resources(convert(instance(1, 1), dicomweb_url=WADO), convert(instance(2, 1), dicomweb_url=WADO))
    assert addresses(merged) == [WADO] and len(merged.imaging_study["endpoint"]) == 1


def test_the_bundle_has_one_conditional_create_per_endpoint():
    merged = merge_resources(convert(instance(), dicomweb_url=WADO), convert(instance(), dicomweb_url=OTHER))
    creates = [e["request"]["ifNoneExist"] for e in render(merged)["entry"] if e["request"]["url"] == "Endpoint"]
    assert creates == [f"identifier=urn:ietf:rfc:3986|{WADO}", f"identifier=urn:ietf:rfc:3986|{OTHER}"]


def test_the_contained_shape_holds_every_endpoint_and_refers_to_them_locally():
    merged = merge_resources(convert(instance(), dicomweb_url=WADO), convert(instance(), dicomweb_url=OTHER))
    study = render(merged, "contained")
    ids = [r["id"] for r in study["contained"] if r["resourceType"] == "Endpoint"]
    assert ids == ["endpoint", "endpoint-2"]
    assert [e["reference"] for e in study["endpoint"]] == ["#endpoint", "#endpoint-2"]
    assert [e["reference"] for e in study["series"][0]["endpoint"]] == ["#endpoint", "#endpoint-2"]


@pytest.mark.parametrize("shape", ["bundle", "contained"])
def test_every_endpoint_survives_the_way_back(shape):
    merged = merge_resources(convert(instance(), dicomweb_url=WADO), convert(instance(), dicomweb_url=OTHER))
    document = render(merged, shape)
    back = parse_resources(json.loads(json.dumps(document)))
    assert addresses(back) == [WADO, OTHER]
    assert render(back, shape) == document
