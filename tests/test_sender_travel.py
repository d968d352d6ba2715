"""The sender travels with the data: recorded in each spool file's meta, it picks the study's
mapping options at delivery ([[senders]]), is refused when a study's senders disagree on
identity, and shows in `status` (read from the file meta only)."""

from __future__ import annotations

import json
import os
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from mapping.options import MappingOptions
from scp.config import config_from_mapping
from scp.errors import DeliveryRejected
from scp.ops.status import build_report, format_report
from scp.pipeline.delivery import deliver_study, redeliver
from scp.receive.dataset import full_file, header_file
from scp.senders import Sender, SenderTable
from scp.store.dead_letter import DeadLetterBox
from scp.store.part10 import EXPLICIT_LE, file_meta, presentation_address, read_source, source_of
from scp.store.spool import FileSpool, MemorySpool
from tests.clocks import FakeClock
from tests.spooled import make_worker, received, spool_instance

CT = get_testdata_file("CT_small.dcm")
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SYSTEM_A, SYSTEM_B, GLOBAL = "urn:oid:1.2.1", "urn:oid:1.2.2", "urn:oid:1.2.999"
PATIENT_ID = "PID-4711"

TABLE = SenderTable.from_config(config_from_mapping({
    "mapping": {"patient_identifier_system": GLOBAL},
    "senders": [{"ae_title": "CT_A", "addresses": ["10.0.5.0/24"], "patient_identifier_system": SYSTEM_A},
                {"ae_title": "CT_B", "patient_identifier_system": SYSTEM_B},
                {"ae_title": "CT_B2", "patient_identifier_system": SYSTEM_B},
                {"ae_title": "TEST", "patient_identifier_system": SYSTEM_B}]}, environ={}))


def spool_from(spool, study_uid: str, ae_title: str, ip: str = "", patient_id: str = PATIENT_ID) -> str:
    instance = received(study_uid, patient_id)
    spool.store(study_uid, instance.sop_uid, header_file(instance, ae_title, presentation_address(ip, 40001)))
    return instance.sop_uid


class Capture:
    name = "capture"

    def __init__(self) -> None:
        self.studies = []

    def deliver(self, resources) -> str:
        self.studies.append(resources)
        return "taken"


def system_of(resources) -> str:
    [identifier] = resources.patient["identifier"]
    return identifier["system"]


# --- the file meta ------------------------------------------------------------------------------


def test_the_file_meta_records_the_calling_ae_title_and_the_peer_address_as_a_dicom_uri():
    meta = file_meta(CT_CLASS, "1.2.3.4", EXPLICIT_LE, "CT_A", presentation_address("10.0.5.21", 40001))
    assert source_of(meta) == ("CT_A", "10.0.5.21")
    read = pydicom.dcmread(BytesIO(meta), force=True).file_meta
    assert read.SourceApplicationEntityTitle == "CT_A"
    assert read.SourcePresentationAddress == "dicom://10.0.5.21:40001"
    assert read["SourcePresentationAddress"].VR == "UR"


def test_an_ipv6_peer_address_is_bracketed_in_the_uri_and_recovered():
    address = presentation_address("2001:db8::21", 104)
    assert address == "dicom://[2001:db8::21]:104"
    assert source_of(file_meta(CT_CLASS, "1.2.3.4", EXPLICIT_LE, "CT_A", address)) == ("CT_A", "2001:db8::21")


def test_a_file_meta_of_the_current_release_without_an_address_reads_with_address_empty():
    meta = file_meta(CT_CLASS, "1.2.3.4", EXPLICIT_LE, "CT_B")  # today's signature: no address
    assert source_of(meta) == ("CT_B", "")
    assert "SourcePresentationAddress" not in pydicom.dcmread(BytesIO(meta), force=True).file_meta


def test_the_sender_is_read_from_the_file_meta_alone(tmp_path):
    instance = received("1.2.3", PATIENT_ID)
    path = tmp_path / "x.dcm"
    meta = header_file(instance, "CT_A", presentation_address("10.0.5.21", 40001))[0]
    path.write_bytes(meta + b"\xff" * 100_000)  # no data set anyone could parse: only the meta is read
    assert read_source(path) == ("CT_A", "10.0.5.21")


def test_the_archive_file_records_the_sender_as_the_spool_file_does():
    instance = received("1.2.3", PATIENT_ID)
    address = presentation_address("10.0.5.21", 40001)
    archived = b"".join(bytes(c) for c in full_file(instance, "CT_A", address))
    assert source_of(archived) == ("CT_A", "10.0.5.21")


# --- delivery -----------------------------------------------------------------------------------


def test_a_studys_mapping_options_are_those_of_its_sender():
    spool, sink = MemorySpool(), Capture()
    spool_from(spool, "1.2.3", "CT_A", "10.0.5.21")
    spool_from(spool, "1.2.4", "CT_B", "192.0.2.7")
    deliver_study("1.2.3", spool.read("1.2.3", sorted(spool.studies()["1.2.3"])), [sink], senders=TABLE)
    report = deliver_study("1.2.4", spool.read("1.2.4", sorted(spool.studies()["1.2.4"])), [sink], senders=TABLE)
    assert [system_of(r) for r in sink.studies] == [SYSTEM_A, SYSTEM_B]
    assert report.senders == (Sender("CT_B", "192.0.2.7"),)


def test_an_ae_title_from_an_address_its_entry_does_not_pair_gets_the_global_options():
    spool, sink = MemorySpool(), Capture()
    spool_from(spool, "1.2.3", "CT_A", "192.0.2.7")  # CT_A's entry names 10.0.5.0/24 only
    deliver_study("1.2.3", spool.read("1.2.3", sorted(spool.studies()["1.2.3"])), [sink], senders=TABLE)
    assert system_of(sink.studies[0]) == GLOBAL


def test_senders_with_the_same_identity_settings_deliver_one_study_together():
    spool, sink = MemorySpool(), Capture()
    spool_from(spool, "1.2.3", "CT_B", "192.0.2.7")
    spool_from(spool, "1.2.3", "CT_B2", "192.0.2.8")
    report = deliver_study("1.2.3", spool.read("1.2.3", sorted(spool.studies()["1.2.3"])), [sink], senders=TABLE)
    assert system_of(sink.studies[0]) == SYSTEM_B and sorted(report.sender_titles()) == ["CT_B", "CT_B2"]


def test_a_study_from_senders_whose_identity_settings_differ_is_rejected_naming_them_not_the_patient():
    spool, sink = MemorySpool(), Capture()
    spool_from(spool, "1.2.3", "CT_A", "10.0.5.21")
    spool_from(spool, "1.2.3", "CT_B", "192.0.2.7")
    with pytest.raises(DeliveryRejected) as caught:
        deliver_study("1.2.3", spool.read("1.2.3", sorted(spool.studies()["1.2.3"])), [sink], senders=TABLE)
    reason = str(caught.value).splitlines()[0]
    assert reason.startswith("SenderConflict: ") and "CT_A" in reason and "CT_B" in reason
    assert "patient_identifier_system" in reason and PATIENT_ID not in reason
    assert sink.studies == []


def test_options_only_delivery_maps_every_sender_with_those_options():
    spool, sink = MemorySpool(), Capture()
    spool_from(spool, "1.2.3", "CT_A", "10.0.5.21")
    spool_from(spool, "1.2.3", "CT_B", "192.0.2.7")  # no table: no [[senders]], no conflict
    deliver_study("1.2.3", spool.read("1.2.3", sorted(spool.studies()["1.2.3"])), [sink],
                  MappingOptions(patient_identifier_system=GLOBAL))
    assert system_of(sink.studies[0]) == GLOBAL


def test_a_spool_file_of_the_current_release_is_delivered_with_its_ae_titles_entry():
    spool, sink = MemorySpool(), Capture()
    spool_instance(spool, "1.2.3")  # header_file(instance, "TEST"): the current release's file meta
    [instance] = spool.read("1.2.3", sorted(spool.studies()["1.2.3"]))
    assert source_of(instance.data) == ("TEST", "")
    report = deliver_study("1.2.3", [instance], [sink], senders=TABLE)
    assert system_of(sink.studies[0]) == SYSTEM_B and report.senders == (Sender("TEST", ""),)


def test_the_worker_dead_letters_a_sender_conflict_and_journals_the_senders(tmp_path):
    spool, sink = MemorySpool(), Capture()
    sops = {spool_from(spool, "1.2.3", "CT_A", "10.0.5.21"), spool_from(spool, "1.2.3", "CT_B", "192.0.2.7")}
    worker = make_worker(tmp_path, spool, [sink], FakeClock(), senders=TABLE)
    worker.submit("1.2.3", sops)
    assert worker.run_once()
    assert sink.studies == [] and spool.studies() == {}
    assert DeadLetterBox(tmp_path / "dead").get("1.2.3").reason.startswith("SenderConflict: ")
    [line] = map(json.loads, (tmp_path / "deliveries.jsonl").read_text().splitlines())
    assert line["result"].startswith("dead-lettered: SenderConflict") and sorted(line["senders"]) == ["CT_A", "CT_B"]


def test_the_worker_journals_the_sender_of_a_delivered_study(tmp_path):
    spool, sink = MemorySpool(), Capture()
    sops = {spool_from(spool, "1.2.3", "CT_A", "10.0.5.21") for _ in range(2)}
    worker = make_worker(tmp_path, spool, [sink], FakeClock(), senders=TABLE)
    worker.submit("1.2.3", sops)
    assert worker.run_once()
    [line] = map(json.loads, (tmp_path / "deliveries.jsonl").read_text().splitlines())
    assert line["result"] == "delivered" and line["senders"] == ["CT_A"]
    assert system_of(sink.studies[0]) == SYSTEM_A


def test_the_conversion_made_ahead_uses_the_senders_options(tmp_path):
    spool, sink = MemorySpool(), Capture()
    clock = FakeClock()
    worker = make_worker(tmp_path, spool, [sink], clock, senders=TABLE)
    sops = [spool_from(spool, "1.2.3", "CT_A", "10.0.5.21") for _ in range(2)]
    for sop in sops:
        worker.arrived("1.2.3", sop)
    clock.now += 1  # quiet: the worker parses and converts ahead
    while worker.work_ahead():
        pass
    versions = {i.sop_uid: i.version for i in spool.read("1.2.3", sops)}
    assert system_of(worker.cache.converted("1.2.3", versions)) == SYSTEM_A
    worker.submit("1.2.3", sops)
    assert worker.run_once()
    assert system_of(sink.studies[0]) == SYSTEM_A


def test_redeliver_maps_a_dead_lettered_study_with_its_senders_options(tmp_path):
    spool, sink = FileSpool(tmp_path / "spool"), Capture()
    sops = {spool_from(spool, "1.2.3", "CT_A", "10.0.5.21")}
    box = DeadLetterBox(tmp_path / "dead")
    box.put("1.2.3", "test", spool=spool, versions={i.sop_uid: i.version for i in spool.read("1.2.3", sops)})
    report = redeliver("1.2.3", [sink], dead_letters=box, senders=TABLE)
    assert system_of(sink.studies[0]) == SYSTEM_A and report.sender_titles() == ["CT_A"]


# --- status -------------------------------------------------------------------------------------


def test_status_shows_the_sender_of_waiting_and_dead_lettered_studies(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    spool_from(spool, "1.2.3", "CT_A", "10.0.5.21")
    spool_from(spool, "1.2.4", "CT_B", "192.0.2.7")
    box = DeadLetterBox(tmp_path / "dead")
    box.put("1.2.4", "SenderConflict: test", spool=spool,
            versions={i.sop_uid: i.version for i in spool.read("1.2.4", sorted(spool.studies()["1.2.4"]))})
    report = build_report(tmp_path / "spool", tmp_path / "dead", now=2e9)
    data = report.to_json()
    assert [(w["study"], w["senders"]) for w in data["waiting"]] == [("1.2.3", ["CT_A"])]
    assert [(d["study"], d["senders"]) for d in data["dead_lettered"]] == [("1.2.4", ["CT_B"])]
    text = "\n".join(format_report(report))
    assert "SENDER" in text and "CT_A" in text and "CT_B" in text
    assert PATIENT_ID not in json.dumps(data) and PATIENT_ID not in text


def test_status_shows_both_senders_of_a_study_split_across_two(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    first = spool_from(spool, "1.2.3", "CT_B", "192.0.2.7")
    second = spool_from(spool, "1.2.3", "CT_B2", "192.0.2.8")
    os.utime(Path(tmp_path / "spool" / "1.2.3" / f"{first}.dcm"), (1e9, 1e9))
    os.utime(Path(tmp_path / "spool" / "1.2.3" / f"{second}.dcm"), (1.5e9, 1.5e9))
    [waiting] = build_report(tmp_path / "spool", tmp_path / "dead", now=2e9).waiting
    assert waiting.senders == ("CT_B", "CT_B2")
