"""ImagingSelections (R5) on their way out: the node's spooled headers keep what they reference,
the disk sink writes and merges them, and the FHIR sink sends a merged part's selections as
conditional creates that refer to the server's ImagingStudy and Patient (FhirSink._send_selections,
a unit test of that one step with a recording client: no R5 server runs in the suite; the
engine is R4)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from mapping import InstanceHeader, MappingOptions, convert_study, parse_resources
from scp.config import FhirConfig
from scp.errors import DeliveryRejected
from scp.sinks.disk import write_study
from scp.sinks.fhir.client import Reply, RequestStats
from scp.sinks.fhir.sink import FhirSink, ServerStudy
from scp.store.part10 import header_dataset

SEG = get_testdata_file("liver_1frame.dcm")
RTSTRUCT = get_testdata_file("rtstruct.dcm")


def r5() -> MappingOptions:
    return MappingOptions(fhir_version="R5")


class RecordingClient:
    """Answers every request with an empty transaction-response and keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []

    def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> Reply:
        self.sent.append((method, path, body))
        return Reply(200, {}, {"resourceType": "Bundle", "type": "transaction-response", "entry": []})


def _sink() -> tuple[FhirSink, RecordingClient]:
    client = RecordingClient()
    return FhirSink(FhirConfig(url="http://127.0.0.1:9/fhir"), r5(), client=client), client  # type: ignore[arg-type]


SERVER_STUDY = ServerStudy("s1", "3", {"resourceType": "ImagingStudy", "subject": {"reference": "Patient/7"}})


def test_a_merged_part_sends_its_selections_as_conditional_creates_on_the_servers_study():
    sink, client = _sink()
    resources = convert_study([pydicom.dcmread(SEG, stop_before_pixels=True)], r5())
    sink._send_selections(SERVER_STUDY, resources, "study x", RequestStats())
    ((method, path, body),) = client.sent
    assert (method, path) == ("POST", "")
    (entry,) = body["entry"]
    assert entry["request"]["method"] == "POST" and entry["request"]["ifNoneExist"].startswith("identifier=")
    assert entry["resource"]["subject"]["reference"] == "Patient/7"
    assert entry["resource"]["derivedFrom"] == [{"reference": "ImagingStudy/s1"}]


def test_a_part_without_selections_sends_nothing_more():
    sink, client = _sink()
    resources = convert_study([pydicom.dcmread(SEG, stop_before_pixels=True)], MappingOptions())
    sink._send_selections(SERVER_STUDY, resources, "study x", RequestStats())
    assert client.sent == []


def test_an_invalid_selection_is_rejected_before_it_is_sent():
    sink, client = _sink()
    resources = convert_study([pydicom.dcmread(SEG, stop_before_pixels=True)], r5())
    without_code = {k: v for k, v in resources.selections[0].items() if k != "code"}  # code is 1..1
    broken = dataclasses.replace(resources, selections=(without_code,))
    with pytest.raises(DeliveryRejected, match="ImagingSelection does not validate as R5"):
        sink._send_selections(SERVER_STUDY, broken, "study x", RequestStats())
    assert client.sent == []


def test_a_spooled_header_keeps_what_a_seg_references():
    # The spool keeps the top-level elements before the pixel data, and reads them back raw.
    with open(SEG, "rb") as file:
        spooled = InstanceHeader.from_dataset(header_dataset(file.read()))
    assert spooled.references == InstanceHeader.from_dataset(pydicom.dcmread(SEG)).references != ()


def _rtstruct_in_seg_study() -> pydicom.Dataset:
    seg = pydicom.dcmread(SEG, stop_before_pixels=True)
    ds = pydicom.dcmread(RTSTRUCT, force=True)
    ds.StudyInstanceUID, ds.PatientID, ds.PatientName = seg.StudyInstanceUID, seg.PatientID, seg.PatientName
    return ds


@pytest.mark.parametrize("shape", ["bundle", "contained"])
def test_the_disk_sink_merges_the_selections_of_two_parts_and_a_resend_changes_nothing(tmp_path, shape):
    first = convert_study([pydicom.dcmread(SEG, stop_before_pixels=True)], r5())
    second = convert_study([_rtstruct_in_seg_study()], r5())
    path, _ = write_study(first, tmp_path, shape)
    assert write_study(second, tmp_path, shape) == (path, True)
    with open(path, encoding="utf-8") as file:
        written = parse_resources(json.load(file))
    assert written.selections == (*first.selections, *second.selections)
    assert write_study(second, tmp_path, shape) == (path, False)
    assert write_study(first, tmp_path, shape) == (path, False)
