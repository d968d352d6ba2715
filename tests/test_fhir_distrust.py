"""The FHIR server is not trusted: stand-ins that drip, answer huge bodies, ignore search
parameters, redirect elsewhere or never answer, each a real HTTP server on port 0 in a thread.

The happy path against the real validating engine is tests/test_fhir_delivery.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from scp.config import FhirConfig
from scp.errors import DeliveryRetryable
from scp.ops.status import build_report
from scp.sinks.disk import DiskSink
from scp.sinks.fhir.client import FhirClient
from scp.sinks.fhir.sink import FhirSink
from scp.store.spool import FileSpool
from scp.web import within_base
from tests.clocks import FakeClock, wait_for
from tests.fhir_standin import Handler, searchset, stand_in  # noqa: F401 (fixture)
from tests.spooled import RecordingSink, make_worker, spool_instance

STUDY = "1.2.826.0.1.3680043.8.498.7001"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.9999"
GIB = 2**30
BLOCK = b" " * 2**20  # what the huge answers are made of, sent again and again (no allocation per write)

def fhir_config(base: str, **extra: Any) -> FhirConfig:
    return FhirConfig(url=base, **extra)


def sink_for(base: str, **extra: Any) -> FhirSink:
    fhir = fhir_config(base, **extra)
    return FhirSink(fhir, client=FhirClient(fhir))


def one_study(tmp_path: Path, study: str = STUDY, instances: int = 2) -> tuple[FileSpool, set[str]]:
    spool = FileSpool(tmp_path / "spool")
    return spool, {spool_instance(spool, study) for _ in range(instances)}


# --- 1. an overall deadline per request -------------------------------------------------------

@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_server_that_drips_is_cut_off_at_the_request_deadline(tmp_path, stand_in, caplog, where):
    def drip(handler: Handler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n")
        if where == "body":
            handler.wfile.write(b"Content-Length: 1000000\r\n\r\n")
        else:
            handler.wfile.write(b"X-Drip: ")
        handler.wfile.flush()
        while not handler.server.stop.wait(0.2):  # type: ignore[attr-defined]
            handler.wfile.write(b"a")  # one byte each 0.2 s: every read well within the 10 s timeout
            handler.wfile.flush()

    server = stand_in(drip)
    spool, sops = one_study(tmp_path)
    worker = make_worker(tmp_path, spool, [sink_for(server.base, timeout=10, request_deadline=1)], FakeClock())
    worker.submit(STUDY, sops)

    started = time.monotonic()
    worker.run_once()
    took = time.monotonic() - started

    assert took < 1 + 5, f"the request took {took:.1f} s, past the 1 s deadline (the bound the issue states)"
    [line] = [r.getMessage() for r in caplog.records if "delivery attempt 1 failed" in r.getMessage()]
    assert "request deadline passed (fhir.request_deadline)" in line and "within the deadline of 1 s" in line
    assert sorted(spool.read(STUDY, sorted(sops)), key=lambda i: i.sop_uid)  # still in the spool
    assert not (tmp_path / "dead" / STUDY).exists()


# --- 2. the answer's size is capped -----------------------------------------------------------

@pytest.mark.parametrize("announced", [False, True], ids=["streamed", "content-length"])
def test_a_huge_answer_is_not_read_past_the_cap_and_memory_stays_bounded(stand_in, announced):
    sent = []

    def huge(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/fhir+json")
        if announced:
            handler.send_header("Content-Length", str(GIB))
        handler.send_header("Connection", "close")
        handler.end_headers()
        total = 0
        try:
            while total < GIB:  # a 1 GB answer, as long as the client reads
                handler.wfile.write(BLOCK)
                total += len(BLOCK)
        finally:
            sent.append(total)

    server = stand_in(huge)
    cap = 8 * 2**20
    client = FhirClient(fhir_config(server.base, max_response_bytes=cap))

    tracemalloc.start()
    try:
        with pytest.raises(DeliveryRetryable, match=r"answer too large \(fhir.max_response_bytes\)") as caught:
            client.request("GET", "ImagingStudy", context=f"study {STUDY}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert f"study {STUDY}: " in str(caught.value) and f"cap of {cap} bytes" in str(caught.value)
    assert peak < cap + 16 * 2**20, f"{peak} bytes allocated while reading: more than the cap and a margin"
    wait_for(lambda: sent, 10, "the stand-in to notice the client gave up")
    assert sent[0] < 100 * 2**20, f"{sent[0]} bytes of the 1 GB answer were taken from the stand-in"


# --- 3. search results are checked ------------------------------------------------------------

def test_a_server_ignoring_the_study_search_gets_nothing_merged_and_the_study_is_set_aside(tmp_path, stand_in):
    unrelated = {"resourceType": "ImagingStudy", "id": "other", "status": "available",
                 "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{OTHER_STUDY}"}],
                 "subject": {"reference": "Patient/p1"}, "meta": {"versionId": "1"}}

    def ignores_search(handler: Handler) -> None:
        if handler.command == "GET":
            handler.send_json(200, searchset(unrelated))  # whatever was asked for
        else:
            handler.send_json(500, {"resourceType": "OperationOutcome", "issue": []})

    server = stand_in(ignores_search)
    spool, sops = one_study(tmp_path)
    worker = make_worker(tmp_path, spool, [sink_for(server.base)], FakeClock())
    worker.submit(STUDY, sops)
    worker.run_once()

    assert [method for method, _ in server.seen] == ["GET"]  # no PUT, no POST: nothing merged into it
    reason = (tmp_path / "dead" / STUDY / "reason.txt").read_text().splitlines()[0]
    assert "FHIR server fault" in reason and "ImagingStudy/other" in reason
    assert "ignored the search parameter" in reason and "not merged into it" in reason
    [shown] = build_report(tmp_path / "spool", tmp_path / "dead", time.time()).dead_lettered
    assert shown.study == STUDY and "ignored the search parameter" in shown.reason
    assert json.loads((tmp_path / "dead" / STUDY / "server-imagingstudy.json").read_text())["id"] == "other"


@pytest.mark.parametrize("prefer", ["representation", "minimal"])
def test_a_server_ignoring_the_patient_match_is_a_server_fault_and_the_study_is_set_aside(tmp_path, stand_in, prefer):
    someone_else = {"resourceType": "Patient", "id": "someone-else",
                    "identifier": [{"system": "urn:oid:9.9", "value": "OTHER-PATIENT"}]}

    def ignores_patient_search(handler: Handler) -> None:
        if handler.command == "GET" and handler.path.startswith("/R4/ImagingStudy"):
            handler.send_json(200, searchset())
        elif handler.command == "GET" and handler.path == "/R4/Patient/someone-else":
            handler.send_json(200, someone_else)
        elif handler.command == "POST":
            sent = json.loads(handler.body)
            entries = []
            for entry in sent["entry"]:
                kind = entry["resource"]["resourceType"]
                if kind == "Patient":  # ifNoneExist "matched" a patient without the identifier asked for
                    answer = {"response": {"status": "200 OK", "location": "Patient/someone-else/_history/1"}}
                    if prefer == "representation":
                        answer["resource"] = someone_else
                else:
                    answer = {"response": {"status": "201 Created", "location": f"{kind}/new/_history/1"}}
                entries.append(answer)
            handler.send_json(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries})
        else:
            handler.send_json(404, {"resourceType": "OperationOutcome", "issue": []})

    server = stand_in(ignores_patient_search)
    spool, sops = one_study(tmp_path)
    worker = make_worker(tmp_path, spool, [sink_for(server.base)], FakeClock())
    worker.submit(STUDY, sops)
    worker.run_once()

    reason = (tmp_path / "dead" / STUDY / "reason.txt").read_text().splitlines()[0]
    assert "FHIR server fault" in reason and "matched Patient/someone-else" in reason
    assert "does not carry that identifier" in reason and "PID1" not in reason  # never a patient ID in a reason
    [shown] = build_report(tmp_path / "spool", tmp_path / "dead", time.time()).dead_lettered
    assert shown.study == STUDY and "conditional create of the study's Patient" in shown.reason


# --- 4. redirects -----------------------------------------------------------------------------

def test_a_redirect_to_another_host_is_a_configuration_error_logged_once_and_the_study_kept(
        tmp_path, stand_in, caplog):
    elsewhere = stand_in(lambda handler: handler.send_json(200, searchset()))
    moved = elsewhere.base.replace("/R4", "/fhir")

    def redirects(handler: Handler) -> None:
        handler.send_response(307)
        handler.send_header("Location", moved + handler.path.removeprefix("/R4"))
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    server = stand_in(redirects)
    spool, sops = one_study(tmp_path)
    clock = FakeClock()
    worker = make_worker(tmp_path, spool, [sink_for(server.base)], clock)
    worker.submit(STUDY, sops)
    worker.run_once()
    clock.now += 120
    worker.run_once()

    assert elsewhere.seen == []  # never followed
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "configuration error" in errors[0] and "outside the base URL" in errors[0] and "fhir.url" in errors[0]
    assert len(server.seen) == 2  # retried, not dropped
    assert len(list(spool.read(STUDY, sorted(sops)))) == 2 and not (tmp_path / "dead" / STUDY).exists()


def test_a_redirect_within_the_base_url_is_followed(stand_in):
    def moved_within(handler: Handler) -> None:
        if handler.path == "/R4/metadata":
            handler.send_response(302)
            handler.send_header("Location", "/R4/v2/metadata")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        else:
            handler.send_json(200, {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})

    server = stand_in(moved_within)
    reply = FhirClient(fhir_config(server.base)).request("GET", "metadata", expect=(200,))

    assert reply.body["resourceType"] == "CapabilityStatement"
    assert [path for _, path in server.seen] == ["/R4/metadata", "/R4/v2/metadata"]


@pytest.mark.parametrize(("url", "inside"), [
    ("https://fhir.example/R4/Patient/1", True),
    ("https://fhir.example:443/R4", True),
    ("https://FHIR.example/R4/x", True),
    ("https://fhir.example/R4x/Patient", False),  # a sibling path, not under the base
    ("https://fhir.example/other", False),
    ("http://fhir.example/R4/Patient", False),  # a downgrade to plain HTTP
    ("https://fhir.example:8443/R4/Patient", False),
    ("https://evil.example/R4/Patient", False),
    ("https://fhir.example/R4/../admin", False),  # dot segments climb out of the base
    ("https://fhir.example/R4/%2E%2E/admin", False),
])
def test_within_the_base_url_means_same_scheme_host_port_and_a_path_under_it(url, inside):
    assert within_base(url, "https://fhir.example/R4") is inside


# --- 5. a slow destination holds up only its own studies ---------------------------------------

def test_a_stuck_fhir_destination_does_not_hold_up_the_disk_output_of_other_studies(tmp_path, stand_in):
    release = threading.Event()
    holding: list[str] = []

    def stuck(handler: Handler) -> None:
        holding.append(handler.path)
        release.wait(30)  # bounded: the test releases it
        handler.send_json(503, {"resourceType": "OperationOutcome", "issue": []})

    server = stand_in(stuck)
    spool = FileSpool(tmp_path / "spool")
    first = {spool_instance(spool, STUDY)}
    second = {spool_instance(spool, OTHER_STUDY)}
    out = tmp_path / "out"
    worker = make_worker(tmp_path, spool, [DiskSink(out), sink_for(server.base, timeout=60, request_deadline=60)],
                         time.monotonic, workers=2)
    worker.start()
    try:
        worker.submit(STUDY, first)
        wait_for(lambda: holding, 20, "the first study's request to reach the stuck server")
        worker.submit(OTHER_STUDY, second)
        wait_for(lambda: (out / f"{OTHER_STUDY}.json").exists(), 20, "the second study's disk output")
        assert not release.is_set() and len(holding) >= 1  # the first study's request is still held
    finally:
        release.set()
        worker.stop(timeout=20)
    assert (out / f"{STUDY}.json").exists()  # its disk output was written before the FHIR request


def test_a_study_is_never_delivered_by_two_threads_at_once(tmp_path):
    gate = threading.Event()
    busy: list[int] = []
    lock = threading.Lock()
    at_once = [0]

    class Slow(RecordingSink):
        def deliver(self, resources: Any) -> str:
            with lock:
                at_once[0] += 1
                busy.append(at_once[0])
            gate.wait(20)
            with lock:
                at_once[0] -= 1
            return super().deliver(resources)

    sink = Slow("slow")
    spool = FileSpool(tmp_path / "spool")
    worker = make_worker(tmp_path, spool, [sink], time.monotonic, workers=4)
    worker.start()
    try:
        worker.submit(STUDY, {spool_instance(spool, STUDY)})
        wait_for(lambda: busy, 20, "the first part's delivery to start")
        worker.submit(STUDY, {spool_instance(spool, STUDY)})  # a second part while the first is delivered
        gate.set()
        wait_for(lambda: len(sink.delivered) == 2, 20, "both parts delivered")
    finally:
        gate.set()
        worker.stop(timeout=20)
    assert max(busy) == 1  # one thread at a time for one study
    assert len(sink.delivered[0]) == 1 and len(sink.delivered[1]) == 1  # the second part after the first
    assert sink.delivered[0] != sink.delivered[1]


def test_delivery_workers_must_be_at_least_one(tmp_path):
    with pytest.raises(ValueError, match="workers: expected at least 1"):
        make_worker(tmp_path, FileSpool(tmp_path / "spool"), [], FakeClock(), workers=0)


# --- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("fhir", "request_deadline", 0, "fhir.request_deadline: expected a positive number of seconds, got 0"),
    ("fhir", "max_response_bytes", 10, "fhir.max_response_bytes: expected a size of at least 1024 bytes, got 10"),
    ("node", "delivery_workers", 0, "node.delivery_workers: expected a number of threads from 1 to 64, got 0"),
])
def test_the_bounds_of_distrust_are_validated_with_a_clear_message(section, key, value, expected):
    from scp.config import config_from_mapping
    from scp.errors import ConfigurationError

    extra = {"url": "http://fhir.test/R4"} if section == "fhir" else {}
    with pytest.raises(ConfigurationError) as caught:
        config_from_mapping({section: {key: value, **extra}}, environ={})
    assert expected in str(caught.value)


def test_the_defaults_bound_every_request_and_answer():
    from scp.config import Config

    config = Config()
    assert (config.fhir.request_deadline, config.fhir.max_response_bytes) == (120.0, 64 * 2**20)
    assert config.node.delivery_workers == 4
