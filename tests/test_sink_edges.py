"""The edges of the mapping: what the sinks write or send is validated there, once.

The mapping and the sinks work on FHIR JSON dicts (mapping.StudyResources); fhir.resources
checks a study against R4 where it leaves: the disk sink before writing a changed file, the
FHIR sink before sending. The FHIR sink's tests here run against a stand-in client (no
server): what matters is which requests it would send.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import mapping.fhirjson as fhirjson
import scp.sinks.fhir.sink as fhir_sink
from mapping import MappingOptions, StudyResources, convert_study, render
from scp.config import FhirConfig
from scp.errors import DeliveryRejected
from scp.sinks.disk import DiskSink, write_study
from scp.sinks.fhir.client import Reply
from tests.mapping_cases import CT_SMALL, STUDY, instance, read

GOLDEN = Path(__file__).parent / "golden"
OPTIONS = MappingOptions(patient_identifier_system="http://hospital.example/mrn",
                         dicomweb_url="https://pacs.example/dicom-web")
UTC_FRACTION = {"StudyDate": "20050906", "StudyTime": "101530.7", "TimezoneOffsetFromUTC": "+0000"}
BAD_DATE = "31.01.1970"  # what a patient value in an error message would look like


def with_patient(resources: StudyResources, **values: Any) -> StudyResources:
    return dataclasses.replace(resources, patient={**resources.patient, **values})


# --- the disk sink ------------------------------------------------------------------------------

def test_output_files_are_byte_identical_to_those_written_through_the_models(tmp_path):
    # The golden files were written by the tool before its mapping worked on dicts.
    path, _ = write_study(convert_study([read(CT_SMALL)], OPTIONS), tmp_path)
    assert path.read_bytes() == (GOLDEN / "ct_small.bundle.json").read_bytes()


@pytest.mark.parametrize("shape", ["bundle", "contained"])
def test_a_merge_adding_elements_writes_them_where_the_models_wrote_them(tmp_path, shape):
    part1 = convert_study([instance(1, 1, **UTC_FRACTION), instance(1, 2, **UTC_FRACTION)])
    part2 = convert_study([instance(2, 3, **{**UTC_FRACTION, "StudyTime": "101530.700"}, StudyDescription="Head",
                                    SeriesDescription="Axial", Laterality="R", SeriesDate="20050906",
                                    SeriesTime="1016", PatientSex="F", PatientBirthDate="19700131"),
                           instance(1, 2, **UTC_FRACTION, SeriesDescription="Scout")],
                          MappingOptions(dicomweb_url="https://pacs.example/dicom-web"))
    write_study(part1, tmp_path, shape)
    path, _ = write_study(part2, tmp_path, shape)
    assert path.read_bytes() == (GOLDEN / f"two_parts.{shape}.json").read_bytes()


def test_the_disk_sink_rejects_a_study_that_does_not_validate_naming_places_not_values(tmp_path):
    invalid = with_patient(convert_study([instance()]), birthDate=BAD_DATE)

    with pytest.raises(DeliveryRejected) as caught:
        DiskSink(tmp_path).deliver(invalid)

    message = str(caught.value)
    assert STUDY in message and "Patient" in message and "birthDate" in message
    assert BAD_DATE not in message
    assert not (tmp_path / f"{STUDY}.json").exists()


def test_an_existing_file_whose_values_do_not_validate_is_kept_and_reported_unusable(tmp_path):
    path, _ = write_study(convert_study([instance()]), tmp_path)
    document = json.loads(path.read_text())
    document["entry"][0]["resource"]["birthDate"] = BAD_DATE  # the Patient entry
    path.write_text(json.dumps(document))
    before = path.read_bytes()

    with pytest.raises(DeliveryRejected, match="not a study this tool wrote.*move it away") as caught:
        DiskSink(tmp_path).deliver(convert_study([instance(1, 2)]))

    assert BAD_DATE not in str(caught.value)
    assert path.read_bytes() == before


def test_an_unchanged_study_is_not_validated_again(tmp_path, monkeypatch):
    resources = convert_study([instance(), instance(2, 1)])
    write_study(resources, tmp_path)
    checked = []
    monkeypatch.setattr("scp.sinks.disk.validate_resources", checked.append)

    assert DiskSink(tmp_path).deliver(resources).endswith("unchanged")
    assert checked == []


# --- the FHIR sink ------------------------------------------------------------------------------

class StandInClient:
    """Answers the ImagingStudy search with `server` (or nothing), a transaction with "201 Created"
    for each entry; records every request."""

    shown_base = "http://fhir.example"

    def __init__(self, server: dict[str, Any] | None = None) -> None:
        self.server = server
        self.sent: list[tuple[str, str, Any]] = []

    def request(self, method: str, path: str, *, body: Any = None, params: Any = None, **_: Any) -> Reply:
        self.sent.append((method, path, params if method == "GET" else body))
        if method == "GET":
            entries = [{"resource": self.server, "search": {"mode": "match"}}] if self.server else []
            return Reply(200, {}, {"resourceType": "Bundle", "type": "searchset", "entry": entries})
        created = [{"response": {"status": "201 Created", "location": f"{e['request']['url']}/1/_history/1"}}
                   for e in body.get("entry") or []]
        return Reply(200, {}, {"resourceType": "Bundle", "type": "transaction-response", "entry": created})

    @property
    def methods(self) -> list[str]:
        return [method for method, _, _ in self.sent]


def server_copy(resources: StudyResources, **changes: Any) -> dict[str, Any]:
    """The ImagingStudy as a server holds it after the first delivery: its id and meta, its references."""
    study = json.loads(json.dumps(resources.imaging_study))
    study.update(id="17", meta={"versionId": "1"}, subject={**study["subject"], "reference": "Patient/5"})
    return {**study, **changes}


def deliver(client: StandInClient, resources: StudyResources) -> str:
    return fhir_sink.FhirSink(FhirConfig(url=client.shown_base), client=client).deliver(resources)


def test_a_new_study_that_does_not_validate_is_rejected_before_it_is_sent():
    client = StandInClient()
    invalid = with_patient(convert_study([instance()]), birthDate=BAD_DATE)

    with pytest.raises(DeliveryRejected) as caught:
        deliver(client, invalid)

    message = str(caught.value)
    assert "MappingError" in message and STUDY in message and "birthDate" in message and BAD_DATE not in message
    assert client.methods == ["GET"]  # the search; the Bundle never left
    assert json.loads(caught.value.documents["bundle.json"])["type"] == "transaction"


def test_a_merged_study_that_does_not_validate_is_rejected_before_the_put():
    client = StandInClient(server_copy(convert_study([instance()])))
    part = convert_study([instance(1, 2)])
    invalid = dataclasses.replace(part, imaging_study={**part.imaging_study, "started": "yesterday"})

    with pytest.raises(DeliveryRejected, match="MappingError.*ImagingStudy.*started") as caught:
        deliver(client, invalid)

    assert client.methods == ["GET"]
    assert json.loads(caught.value.documents["imagingstudy.json"])["id"] == "17"  # what the PUT would carry


def test_an_invalid_server_imaging_study_is_rejected_with_its_document_kept():
    client = StandInClient(server_copy(convert_study([instance()]), numberOfSeries="one"))

    with pytest.raises(DeliveryRejected, match="not a valid R4 ImagingStudy") as caught:
        deliver(client, convert_study([instance(1, 2)]))

    assert client.methods == ["GET"]
    assert json.loads(caught.value.documents["server-imagingstudy.json"])["numberOfSeries"] == "one"


def test_a_server_imaging_study_without_the_structure_of_one_is_rejected_not_merged():
    client = StandInClient(server_copy(convert_study([instance()]), series={"uid": "1.2.3"}))

    with pytest.raises(DeliveryRejected, match="not a valid R4 ImagingStudy") as caught:
        deliver(client, convert_study([instance(1, 2)]))

    assert "server-imagingstudy.json" in caught.value.documents


def test_a_server_writing_the_same_values_in_another_format_counts_as_unchanged():
    resources = convert_study([read(CT_SMALL)])
    assert resources.imaging_study["started"] == "2004-01-19T07:27:30-05:00"
    client = StandInClient(server_copy(resources, started="2004-01-19T07:27:30.000-05:00"))

    assert "unchanged" in deliver(client, resources)
    assert client.methods == ["GET"]


def test_a_resend_is_decided_on_the_servers_json_without_a_model(monkeypatch):
    resources = convert_study([instance(), instance(2, 1)])
    client = StandInClient(server_copy(resources))
    monkeypatch.setattr(fhir_sink, "_as_model", lambda *_: pytest.fail("validated the server's ImagingStudy"))

    assert "unchanged" in deliver(client, resources)


def test_the_fhir_sink_uses_the_mappings_fhir_json_helpers():
    assert not hasattr(fhir_sink, "STUDY_UID_SYSTEM")
    for name in ("canonical", "identifier_pairs", "same_identifier", "study_search", "validated"):
        assert getattr(fhir_sink, name) is getattr(fhirjson, name), name


def test_the_fhir_sink_searches_the_study_by_the_token_the_bundle_uses():
    client = StandInClient()
    resources = convert_study([instance()])
    bundle = render(resources, "bundle")

    deliver(client, resources)

    (_, _, params), *_ = client.sent
    assert params["identifier"] == fhirjson.study_search(STUDY) == f"urn:dicom:uid|urn:oid:{STUDY}"
    assert bundle["entry"][-1]["request"]["ifNoneExist"] == f"identifier=urn:dicom:uid|urn:oid:{STUDY}"
