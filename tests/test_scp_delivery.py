"""Delivery rules: completed part -> mapping -> sinks; retries with backoff; dead letter.

Unit tests with an in-memory spool, a fake clock and recording sinks (the sinks' own
behaviour is tested elsewhere, against the real disk and a real FHIR server).
"""

from __future__ import annotations

import json
import threading

import pytest

from mapping.options import MappingOptions
from scp.store.dead_letter import DeadLetterBox
from scp.pipeline.delivery import redeliver
from scp.pipeline.retry import RetryPolicy
from scp.store.journal import Journal
from scp.sinks.disk import DiskSink
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.store.spool import FileSpool, MemorySpool
from tests.clocks import FakeClock
from tests.spooled import RecordingSink, make_worker, spool_instance





@pytest.fixture
def clock():
    return FakeClock()


def test_a_completed_study_goes_to_every_sink_and_leaves_the_spool(tmp_path, clock):
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3") for _ in range(3)}
    a, b = RecordingSink("a"), RecordingSink("b")
    worker = make_worker(tmp_path, spool, [a, b], clock)
    worker.submit("1.2.3", sops)
    assert worker.run_once()
    assert a.delivered == [sops] and b.delivered == [sops]
    assert spool.studies() == {}
    [line] = (tmp_path / "deliveries.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["study"] == "1.2.3" and record["instances"] == 3 and record["result"] == "delivered"
    assert record["sinks"] == {"a": "3 instance(s)", "b": "3 instance(s)"}


def test_an_instance_received_again_during_the_delivery_stays_for_the_next_completion(tmp_path, clock):
    spool = MemorySpool()
    sop = spool_instance(spool, "1.2.3")

    class ResendingSink(RecordingSink):
        def deliver(self, resources):
            # the same instance arrives again while the study is being delivered
            spool.store("1.2.3", sop, [next(iter(spool.read("1.2.3", [sop]))).data])
            return super().deliver(resources)

    worker = make_worker(tmp_path, spool, [ResendingSink()], clock)
    worker.submit("1.2.3", {sop})
    worker.run_once()
    assert spool.studies() == {"1.2.3": {sop}}


def test_a_retryable_failure_keeps_the_study_and_retries_after_a_backoff(tmp_path, clock):
    spool = MemorySpool()
    sop = spool_instance(spool, "1.2.3")
    sink = RecordingSink(failures=[DeliveryRetryable("503"), DeliveryRetryable("503")])
    worker = make_worker(tmp_path, spool, [sink], clock)
    worker.submit("1.2.3", {sop})
    assert worker.run_once()
    assert spool.studies() == {"1.2.3": {sop}}
    assert not worker.run_once()  # not due yet: 1 s backoff
    clock.now += 1.0
    assert worker.run_once()
    assert not worker.run_once()
    clock.now += 1.9
    assert not worker.run_once()  # the second backoff doubles
    clock.now += 0.1
    assert worker.run_once()
    assert sink.delivered == [{sop}]
    assert spool.studies() == {}


def test_sinks_that_took_a_part_are_not_asked_again_on_retry(tmp_path, clock):
    spool = MemorySpool()
    sop = spool_instance(spool, "1.2.3")
    disk, fhir = RecordingSink("disk"), RecordingSink("fhir", failures=[DeliveryRetryable("timeout")])
    worker = make_worker(tmp_path, spool, [disk, fhir], clock)
    worker.submit("1.2.3", {sop})
    worker.run_once()
    clock.now += 5
    worker.run_once()
    assert len(disk.delivered) == 1 and len(fhir.delivered) == 1


def test_a_part_completing_while_an_earlier_part_waits_for_a_retry_is_delivered_with_it(tmp_path, clock):
    spool = MemorySpool()
    first = spool_instance(spool, "1.2.3")
    sink = RecordingSink(failures=[DeliveryRetryable("down")])
    worker = make_worker(tmp_path, spool, [sink], clock)
    worker.submit("1.2.3", {first})
    worker.run_once()
    second = spool_instance(spool, "1.2.3")
    worker.submit("1.2.3", {second})
    clock.now += 5
    worker.run_once()
    assert sink.delivered == [{first, second}]
    assert spool.studies() == {}


def test_backoff_is_exponential_with_jitter_capped_and_honours_retry_after():
    policy = RetryPolicy(max_backoff=300)
    assert policy.delay(1, rand=lambda: 1.0) == 1.0
    assert policy.delay(4, rand=lambda: 1.0) == 8.0
    assert policy.delay(4, rand=lambda: 0.0) == 4.0  # jitter: 50-100 %
    assert policy.delay(30, rand=lambda: 1.0) == 300  # the cap
    assert policy.delay(1, retry_after=20, rand=lambda: 1.0) == 20
    assert policy.delay(1, retry_after=1000, rand=lambda: 1.0) == 300


def test_a_cap_below_the_first_delay_caps_it_too():
    assert RetryPolicy(max_backoff=0.5).delay(1, rand=lambda: 1.0) == 0.5


@pytest.mark.parametrize("settings", [{"base": 0}, {"max_backoff": -1}])
def test_a_retry_policy_needs_positive_delays(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        RetryPolicy(**settings)


def test_a_rejected_delivery_moves_the_study_to_the_dead_letter_folder_with_its_reason(tmp_path, clock):
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3") for _ in range(2)}
    sink = RecordingSink(failures=[DeliveryRejected("HTTP 422: invalid resource",
                                                    documents={"outcome.json": b'{"resourceType": "OperationOutcome"}'})])
    worker = make_worker(tmp_path, spool, [sink], clock)
    worker.submit("1.2.3", sops)
    worker.run_once()
    folder = tmp_path / "dead" / "1.2.3"
    assert (folder / "reason.txt").read_text().splitlines()[0] == "HTTP 422: invalid resource"
    assert (folder / "outcome.json").read_bytes() == b'{"resourceType": "OperationOutcome"}'
    assert {p.stem for p in (folder / "instances").iterdir()} == sops
    assert spool.studies() == {}
    record = json.loads((tmp_path / "deliveries.jsonl").read_text().splitlines()[-1])
    assert record["result"].startswith("dead-lettered")


def test_instances_disagreeing_on_patient_id_are_dead_lettered_without_quoting_the_ids(tmp_path, clock, caplog):
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3", patient_id="SECRET-A"), spool_instance(spool, "1.2.3", patient_id="SECRET-B")}
    sink = RecordingSink()
    worker = make_worker(tmp_path, spool, [sink], clock)
    worker.submit("1.2.3", sops)
    worker.run_once()
    reason = (tmp_path / "dead" / "1.2.3" / "reason.txt").read_text()
    assert "PatientMismatchError" in reason
    assert sink.delivered == []
    assert "SECRET" not in reason
    assert "SECRET" not in "\n".join(r.getMessage() for r in caplog.records if r.levelno >= 20)


def test_a_further_part_of_a_dead_lettered_study_joins_it_instead_of_being_delivered(tmp_path, clock):
    spool = MemorySpool()
    first = spool_instance(spool, "1.2.3")
    sink = RecordingSink(failures=[DeliveryRejected("rejected")])
    worker = make_worker(tmp_path, spool, [sink], clock)
    worker.submit("1.2.3", {first})
    worker.run_once()
    second = spool_instance(spool, "1.2.3")
    worker.submit("1.2.3", {second})
    worker.run_once()
    assert sink.delivered == []
    assert {p.stem for p in (tmp_path / "dead" / "1.2.3" / "instances").iterdir()} == {first, second}


def test_redeliver_sends_a_dead_lettered_study_and_removes_it_from_the_folder(tmp_path, clock):
    spool = FileSpool(tmp_path / "spool")
    sops = {spool_instance(spool, "1.2.3") for _ in range(2)}
    worker = make_worker(tmp_path, spool, [RecordingSink(failures=[DeliveryRejected("no")])], clock)
    worker.submit("1.2.3", sops)
    worker.run_once()
    box = DeadLetterBox(tmp_path / "dead")
    assert [d.study_uid for d in box.list()] == ["1.2.3"]
    sink = RecordingSink()
    report = redeliver("1.2.3", [sink], MappingOptions(), dead_letters=box,
                       journal=Journal(tmp_path / "deliveries.jsonl"))
    assert report.instances == 2 and sink.delivered == [sops]
    assert box.list() == [] and not (tmp_path / "dead" / "1.2.3").exists()


def test_a_study_that_cannot_be_set_aside_stays_in_the_spool_and_is_tried_again(tmp_path, clock):
    spool = FileSpool(tmp_path / "spool")
    sops = {spool_instance(spool, "1.2.3") for _ in range(2)}
    (tmp_path / "dead").write_text("a file where the dead-letter folder should be")
    worker = make_worker(tmp_path, spool, [RecordingSink(failures=[DeliveryRejected("no"), DeliveryRejected("no")])],
                         clock)
    worker.submit("1.2.3", sops)
    assert worker.run_once()  # the delivery thread would run this: it must not raise
    assert spool.studies() == {"1.2.3": sops}
    (tmp_path / "dead").unlink()
    clock.now += 1  # the first backoff
    assert worker.run_once()
    assert spool.studies() == {}
    assert {p.stem for p in (tmp_path / "dead" / "1.2.3" / "instances").iterdir()} == sops


def test_redeliver_still_refused_keeps_the_study_with_the_new_reason_and_documents(tmp_path, clock):
    spool = FileSpool(tmp_path / "spool")
    sops = {spool_instance(spool, "1.2.3") for _ in range(2)}
    worker = make_worker(tmp_path, spool, [RecordingSink(failures=[DeliveryRejected("no")])], clock)
    worker.submit("1.2.3", sops)
    worker.run_once()
    box = DeadLetterBox(tmp_path / "dead")
    refusal = DeliveryRejected("HTTP 422: still invalid", documents={"outcome.json": b"{}"})
    with pytest.raises(DeliveryRejected):
        redeliver("1.2.3", [RecordingSink(failures=[refusal])], MappingOptions(), dead_letters=box)
    letter = box.get("1.2.3")
    assert letter.reason == "HTTP 422: still invalid"
    assert letter.documents["outcome.json"].read_bytes() == b"{}"
    assert {p.stem for p in letter.instances} == sops


def test_requeue_puts_a_dead_lettered_study_back_into_the_spool(tmp_path, clock):
    spool = FileSpool(tmp_path / "spool")
    sops = {spool_instance(spool, "1.2.3") for _ in range(2)}
    worker = make_worker(tmp_path, spool, [RecordingSink(failures=[DeliveryRejected("no")])], clock)
    worker.submit("1.2.3", sops)
    worker.run_once()
    assert DeadLetterBox(tmp_path / "dead").requeue("1.2.3", spool) == 2
    assert spool.studies() == {"1.2.3": sops}


def test_the_disk_sink_merges_parts_into_one_file(tmp_path, clock):
    spool = MemorySpool()
    sink = DiskSink(tmp_path / "out")
    worker = make_worker(tmp_path, spool, [sink], clock)
    first = spool_instance(spool, "1.2.3")
    worker.submit("1.2.3", {first})
    worker.run_once()
    second = spool_instance(spool, "1.2.3", series_uid="1.2.3.2")
    worker.submit("1.2.3", {second})
    worker.run_once()
    document = json.loads((tmp_path / "out" / "1.2.3.json").read_text())
    study = next(e["resource"] for e in document["entry"] if e["resource"]["resourceType"] == "ImagingStudy")
    assert study["numberOfSeries"] == 2 and study["numberOfInstances"] == 2


def test_an_unexpected_error_in_a_sink_keeps_the_study_for_a_retry(tmp_path, clock):
    spool = MemorySpool()
    sop = spool_instance(spool, "1.2.3")
    sink = RecordingSink(failures=[RuntimeError("bug")])
    worker = make_worker(tmp_path, spool, [sink], clock)
    worker.submit("1.2.3", {sop})
    worker.run_once()
    assert spool.studies() == {"1.2.3": {sop}}
    clock.now += 1
    worker.run_once()
    assert sink.delivered == [{sop}]


def arrive(worker, study_uid: str, sops) -> None:
    for sop in sops:
        worker.arrived(study_uid, sop)


def test_headers_parsed_ahead_while_the_node_is_quiet_are_used_at_completion(tmp_path, clock):
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3") for _ in range(3)}
    worker = make_worker(tmp_path, spool, [RecordingSink()], clock)
    arrive(worker, "1.2.3", sops)
    clock.now += 1  # quiet
    assert worker.work_ahead() is True  # the headers
    assert len(worker.cache) == 3
    assert worker.work_ahead() is True  # the conversion
    assert worker.work_ahead() is False  # nothing left to do until more arrives
    assert worker.cache.is_converted("1.2.3", sops)
    worker.submit("1.2.3", sops)
    worker.run_once()
    assert len(worker.cache) == 0
    assert json.loads((tmp_path / "deliveries.jsonl").read_text())["instances"] == 3


def test_nothing_is_parsed_ahead_while_instances_arrive(tmp_path, clock):
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3")}
    worker = make_worker(tmp_path, spool, [RecordingSink()], clock)
    arrive(worker, "1.2.3", sops)
    clock.now += 0.01  # the last instance arrived a moment ago
    assert worker.work_ahead() is False
    assert len(worker.cache) == 0


def test_receivers_in_other_processes_let_headers_be_parsed_while_instances_arrive(tmp_path, clock):
    # node.workers > 1: the parsing takes no GIL from the receive threads, so it need not wait
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3") for _ in range(2)}
    worker = make_worker(tmp_path, spool, [RecordingSink()], clock, parse_while_receiving=lambda: True)
    arrive(worker, "1.2.3", sops)
    clock.now += 0.01
    assert worker.work_ahead() is True
    assert len(worker.cache) == 2


def test_headers_wait_for_quiet_while_the_receivers_use_every_core(tmp_path, clock):
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3")}
    worker = make_worker(tmp_path, spool, [RecordingSink()], clock, parse_while_receiving=lambda: False)
    arrive(worker, "1.2.3", sops)
    clock.now += 0.01
    assert worker.work_ahead() is False
    assert len(worker.cache) == 0


def test_a_conversion_ahead_waits_for_quiet_even_while_parsing_with_the_arrivals(tmp_path, clock):
    # each arrival would make it stale: converting with every batch would redo the whole study
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3")}
    worker = make_worker(tmp_path, spool, [RecordingSink()], clock, parse_while_receiving=lambda: True)
    arrive(worker, "1.2.3", sops)
    clock.now += 0.01
    worker.work_ahead()
    assert worker.work_ahead() is False
    assert worker.cache.is_converted("1.2.3", sops) is False


def test_nothing_is_parsed_ahead_when_no_instance_waits(tmp_path, clock):
    worker = make_worker(tmp_path, MemorySpool(), [RecordingSink()], clock)
    assert worker.work_ahead() is None


def test_a_completed_part_is_no_longer_parsed_ahead(tmp_path, clock):
    # Its instances are the delivery's business: a study waiting for a retry holds no headers.
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3")}
    worker = make_worker(tmp_path, spool, [RecordingSink(failures=[DeliveryRetryable("down")])], clock)
    arrive(worker, "1.2.3", sops)
    worker.submit("1.2.3", sops)
    worker.run_once()  # fails: waits for a retry
    clock.now += 0.5
    assert worker.work_ahead() is None
    assert len(worker.cache) == 0


def test_a_conversion_made_ahead_is_not_used_when_the_part_differs(tmp_path, clock):
    spool = MemorySpool()
    first = spool_instance(spool, "1.2.3")
    worker = make_worker(tmp_path, spool, [RecordingSink()], clock)
    arrive(worker, "1.2.3", [first])
    clock.now += 1
    worker.work_ahead(), worker.work_ahead()
    second = spool_instance(spool, "1.2.3")
    sink = RecordingSink()
    worker.sinks = [sink]
    worker.submit("1.2.3", {first, second})
    worker.run_once()
    assert sink.delivered == [{first, second}]


def test_redeliver_keeps_instances_set_aside_while_it_ran(tmp_path, clock):
    spool = FileSpool(tmp_path / "spool")
    first = spool_instance(spool, "1.2.3")
    worker = make_worker(tmp_path, spool, [RecordingSink(failures=[DeliveryRejected("no")])], clock)
    worker.submit("1.2.3", {first})
    worker.run_once()
    box = DeadLetterBox(tmp_path / "dead")

    class SetAsideMeanwhile(RecordingSink):
        def deliver(self, resources):
            later = spool_instance(spool, "1.2.3")  # the node sets a further part aside meanwhile
            box.put("1.2.3", "study already in the dead-letter folder", spool=spool,
                    versions={i.sop_uid: i.version for i in spool.read("1.2.3", [later])})
            self.later = later
            return super().deliver(resources)

    sink = SetAsideMeanwhile()
    redeliver("1.2.3", [sink], MappingOptions(), dead_letters=box)
    assert sink.delivered == [{first}]
    assert [p.stem for p in box.get("1.2.3").instances] == [sink.later]


def test_a_failure_while_parsing_ahead_does_not_stop_the_delivery_thread(tmp_path):
    class UnreadableSpool(MemorySpool):
        def __init__(self) -> None:
            super().__init__()
            self.reads = 0
            self.read_twice = threading.Event()

        def read(self, study_uid, sop_uids):
            self.reads += 1
            if self.reads >= 2:
                self.read_twice.set()
            raise OSError(5, "Input/output error")

    spool = UnreadableSpool()
    clock = FakeClock()
    worker = make_worker(tmp_path, spool, [RecordingSink()], clock)
    worker.arrived("1.2.3", "1.2.3.1")
    clock.now += 1
    worker.start()
    try:
        assert spool.read_twice.wait(10), "the delivery thread ended at the first failed read"
    finally:
        worker.stop(timeout=5)
