"""Destinations: each sink is one, each has its own outcome (issue #11, item 4).

Unit tests with an in-memory spool, a fake clock and recording sinks, one per rule:
a study goes only to its destinations; a destination that took it is never asked
again (retries, the dead letter, `retry`); a refusal sets the study aside for the
refusing destination only; a destination that is down keeps retrying while the others
are done; `status` shows each destination's outcome.
"""

from __future__ import annotations

import json

import pytest

from mapping.options import MappingOptions
from scp.cli import main as cli_main
from scp.config import Config, FhirConfig, NodeConfig, SenderConfig
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.node import default_sinks, study_route
from scp.ops.status import build_report, format_report
from scp.pipeline.delivery import redeliver
from scp.senders import Sender
from scp.store.dead_letter import DeadLetterBox
from scp.store.spool import FileSpool, MemorySpool
from tests.clocks import FakeClock
from tests.spooled import RecordingSink, make_worker, spool_instance

STUDY = "1.2.3"




def refusal(text: str, **documents: bytes) -> DeliveryRejected:
    return DeliveryRejected(text, documents={f"{k}.json": v for k, v in documents.items()})


@pytest.fixture
def clock():
    return FakeClock()


def dead_letter_one_refused(tmp_path, clock, *, refused_by: str = "b") -> tuple[list[RecordingSink], set[str]]:
    """A study that sink "a" took and `refused_by` refused, in the dead-letter folder."""
    spool = MemorySpool()
    sops = {spool_instance(spool, STUDY) for _ in range(2)}
    sinks = [RecordingSink(n, [refusal("HTTP 422: invalid")] if n == refused_by else []) for n in ("a", "b")]
    worker = make_worker(tmp_path, spool, sinks, clock)
    worker.submit(STUDY, sops)
    worker.run_once()
    return sinks, sops


def test_a_study_goes_only_to_the_destinations_its_route_names(tmp_path, clock):
    spool = MemorySpool()
    sop = spool_instance(spool, STUDY)
    a, b = RecordingSink("a"), RecordingSink("b")
    seen = []
    worker = make_worker(tmp_path, spool, [a, b], clock, route=lambda senders: seen.append(set(senders)) or ("b",))
    worker.submit(STUDY, {sop})
    assert worker.run_once()
    assert a.delivered == [] and b.delivered == [{sop}]
    assert spool.studies() == {}  # delivered: to every destination it has
    assert seen == [{Sender("TEST")}]  # the senders recorded with the instances (spooled as AE TEST)


def test_a_study_without_known_senders_goes_to_every_configured_destination(tmp_path):
    config = Config(node=NodeConfig(output_dir=tmp_path / "out"), fhir=FhirConfig(url="http://fhir.example/r4"),
                    destinations={"site2": FhirConfig(url="http://other.example/r4")},
                    senders=(SenderConfig(ae_title="CT1", destinations=("site2",)),))
    route = study_route(config)
    assert route is not None
    assert tuple(route([])) == ("disk", "fhir", "site2")
    assert tuple(route([Sender("CT1", "10.0.0.1")])) == ("site2",)


def test_without_senders_there_is_no_route_and_every_sink_is_a_destination(tmp_path):
    assert study_route(Config(node=NodeConfig(output_dir=tmp_path / "out"))) is None


def test_default_sinks_are_one_per_destination_named_as_the_destination(tmp_path):
    config = Config(node=NodeConfig(output_dir=tmp_path / "out"), fhir=FhirConfig(url="http://fhir.example/r4"),
                    destinations={"site2": FhirConfig(url="http://other.example/r4")})
    sinks = default_sinks(config)
    assert [s.name for s in sinks] == ["disk", "fhir", "site2"] == list(config.destination_names())
    assert sinks[2].client.base == "http://other.example/r4"


def test_a_named_destination_alone_needs_no_unnamed_fhir_url(tmp_path):
    config = Config(node=NodeConfig(output_dir=None), destinations={"site2": FhirConfig(url="http://o.example/r4")})
    assert [s.name for s in default_sinks(config)] == ["site2"]


def test_a_destination_that_took_the_study_is_not_asked_again_while_another_is_down(tmp_path, clock):
    spool = MemorySpool()
    sop = spool_instance(spool, STUDY)
    a = RecordingSink("a")
    b = RecordingSink("b", [DeliveryRetryable("503")] * 3)
    worker = make_worker(tmp_path, spool, [a, b], clock)
    worker.submit(STUDY, {sop})
    for _ in range(4):
        assert worker.run_once()
        clock.now += 60
    assert a.delivered == [{sop}] and b.delivered == [{sop}]
    assert spool.studies() == {}


def test_a_destination_after_one_that_is_down_gets_the_study_without_waiting(tmp_path, clock):
    spool = MemorySpool()
    sop = spool_instance(spool, STUDY)
    down, after = RecordingSink("down", [DeliveryRetryable("503")]), RecordingSink("after")
    worker = make_worker(tmp_path, spool, [down, after], clock)
    worker.submit(STUDY, {sop})
    worker.run_once()
    assert after.delivered == [{sop}] and down.delivered == []
    assert spool.studies() == {STUDY: {sop}}  # still waits for "down"


def test_a_refusal_sets_the_study_aside_for_the_refusing_destination_only(tmp_path, clock):
    (a, b), sops = dead_letter_one_refused(tmp_path, clock)
    folder = tmp_path / "dead" / STUDY
    assert a.delivered == [sops]
    assert json.loads((folder / "delivered.json").read_text()) == {"a": "2 instance(s)"}
    assert (folder / "destinations" / "b" / "reason.txt").read_text().splitlines()[0] == "HTTP 422: invalid"
    assert not (folder / "destinations" / "a").exists()
    assert (folder / "reason.txt").read_text().splitlines()[0] == "HTTP 422: invalid"


def test_a_refused_study_waits_in_the_spool_while_another_destination_is_down_then_is_set_aside(tmp_path, clock):
    spool = MemorySpool()
    sop = spool_instance(spool, STUDY)
    took, refusing = RecordingSink("took"), RecordingSink("refusing", [refusal("HTTP 422: invalid")])
    down = RecordingSink("down", [DeliveryRetryable("503")])
    worker = make_worker(tmp_path, spool, [took, refusing, down], clock)
    worker.submit(STUDY, {sop})
    worker.run_once()
    assert spool.studies() == {STUDY: {sop}}  # "down" still waits for it: not set aside yet
    assert not (tmp_path / "dead" / STUDY).exists()
    clock.now += 60
    worker.run_once()
    assert refusing.delivered == [] and len(took.delivered) == 1 and len(down.delivered) == 1
    letter = DeadLetterBox(tmp_path / "dead").get(STUDY)
    assert set(letter.delivered) == {"took", "down"} and set(letter.refused) == {"refusing"}


def test_two_refusing_destinations_keep_their_own_documents(tmp_path, clock):
    spool = MemorySpool()
    sop = spool_instance(spool, STUDY)
    sinks = [RecordingSink("x", [refusal("HTTP 422: x", outcome=b"X")]),
             RecordingSink("y", [refusal("HTTP 400: y", outcome=b"Y")])]
    worker = make_worker(tmp_path, spool, sinks, clock)
    worker.submit(STUDY, {sop})
    worker.run_once()
    folder = tmp_path / "dead" / STUDY
    assert (folder / "destinations" / "x" / "outcome.json").read_bytes() == b"X"
    assert (folder / "destinations" / "y" / "outcome.json").read_bytes() == b"Y"
    assert (folder / "reason.txt").read_text().splitlines()[0] == "x: HTTP 422: x; y: HTTP 400: y"


def test_a_study_that_cannot_be_mapped_is_set_aside_for_every_destination_without_per_destination_reasons(
        tmp_path, clock):
    spool = MemorySpool()
    sops = {spool_instance(spool, STUDY, patient_id="P1"), spool_instance(spool, STUDY, patient_id="P2")}
    a, b = RecordingSink("a"), RecordingSink("b")
    worker = make_worker(tmp_path, spool, [a, b], clock)
    worker.submit(STUDY, sops)
    worker.run_once()
    letter = DeadLetterBox(tmp_path / "dead").get(STUDY)
    assert "PatientMismatchError" in letter.reason
    assert letter.delivered == {} and letter.refused == {}
    assert not (letter.folder / "destinations").exists()


def test_a_further_part_goes_to_the_destination_that_took_the_study_and_joins_the_dead_letter_for_the_other(
        tmp_path, clock):
    spool = MemorySpool()
    first = spool_instance(spool, STUDY)
    a, b = RecordingSink("a"), RecordingSink("b", [refusal("HTTP 422: invalid")])
    worker = make_worker(tmp_path, spool, [a, b], clock)
    worker.submit(STUDY, {first})
    worker.run_once()
    second = spool_instance(spool, STUDY)
    worker.submit(STUDY, {second})
    worker.run_once()
    assert a.delivered == [{first}, {second}] and b.delivered == []
    letter = DeadLetterBox(tmp_path / "dead").get(STUDY)
    assert {p.stem for p in letter.instances} == {first, second}
    assert set(letter.delivered) == {"a"} and set(letter.refused) == {"b"}
    assert spool.studies() == {}


def test_a_further_part_of_a_study_refused_as_a_whole_is_delivered_nowhere(tmp_path, clock):
    spool = FileSpool(tmp_path / "spool")
    box = DeadLetterBox(tmp_path / "dead")
    old = spool_instance(spool, STUDY)
    box.put(STUDY, "HTTP 422: an older version's dead letter", spool=spool,
            versions={i.sop_uid: i.version for i in spool.read(STUDY, [old])})
    new = spool_instance(spool, STUDY)
    a = RecordingSink("a")
    worker = make_worker(tmp_path, spool, [a], clock)
    worker.submit(STUDY, {new})
    worker.run_once()
    assert a.delivered == []
    assert {p.stem for p in box.get(STUDY).instances} == {old, new}


def test_retry_delivers_only_to_the_destinations_that_did_not_take_it(tmp_path, clock):
    dead_letter_one_refused(tmp_path, clock)
    a, b = RecordingSink("a"), RecordingSink("b")
    box = DeadLetterBox(tmp_path / "dead")
    report = redeliver(STUDY, [a, b], MappingOptions(), dead_letters=box)
    assert a.delivered == [] and len(b.delivered) == 1
    assert not box.contains(STUDY)
    assert set(report.sinks) == {"a", "b"}


def test_retry_of_a_dead_letter_without_per_destination_record_goes_to_every_destination(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    sop = spool_instance(spool, STUDY)
    box = DeadLetterBox(tmp_path / "dead")
    box.put(STUDY, "HTTP 422: older layout", spool=spool, versions={i.sop_uid: i.version for i in spool.read(STUDY, [sop])})
    a, b = RecordingSink("a"), RecordingSink("b")
    redeliver(STUDY, [a, b], MappingOptions(), dead_letters=box)
    assert a.delivered == [{sop}] and b.delivered == [{sop}]


def test_retry_still_refused_records_who_took_it_now_and_keeps_the_refusal(tmp_path, clock):
    dead_letter_one_refused(tmp_path, clock)
    box = DeadLetterBox(tmp_path / "dead")
    c, b = RecordingSink("c"), RecordingSink("b", [refusal("HTTP 422: still invalid")])
    with pytest.raises(DeliveryRejected):
        redeliver(STUDY, [c, b], MappingOptions(), dead_letters=box)
    letter = box.get(STUDY)
    assert set(letter.delivered) == {"a", "c"}
    assert letter.refused == {"b": "HTTP 422: still invalid"}


def test_retry_that_finds_a_destination_down_records_the_ones_that_took_it_meanwhile(tmp_path, clock):
    dead_letter_one_refused(tmp_path, clock)
    box = DeadLetterBox(tmp_path / "dead")
    c, b = RecordingSink("c"), RecordingSink("b", [DeliveryRetryable("503")])
    with pytest.raises(DeliveryRetryable):
        redeliver(STUDY, [c, b], MappingOptions(), dead_letters=box)
    c2, b2 = RecordingSink("c"), RecordingSink("b")
    redeliver(STUDY, [c2, b2], MappingOptions(), dead_letters=box)
    assert len(c.delivered) == 1 and c2.delivered == [] and len(b2.delivered) == 1


def test_a_destination_that_took_it_at_retry_no_longer_shows_its_old_refusal(tmp_path, clock):
    dead_letter_one_refused(tmp_path, clock)
    box = DeadLetterBox(tmp_path / "dead")
    with pytest.raises(DeliveryRetryable):
        redeliver(STUDY, [RecordingSink("b"), RecordingSink("d", [DeliveryRetryable("503")])], MappingOptions(),
                  dead_letters=box)
    letter = box.get(STUDY)
    assert set(letter.delivered) == {"a", "b"} and letter.refused == {}


def test_status_shows_per_destination_which_took_the_study_and_which_refused_it(tmp_path, clock):
    dead_letter_one_refused(tmp_path, clock)
    report = build_report(tmp_path / "spool", tmp_path / "dead", now=clock.now)
    [study] = report.to_json()["dead_lettered"]
    assert study["delivered"] == {"a": "2 instance(s)"} and study["refused"] == {"b": "HTTP 422: invalid"}
    text = "\n".join(format_report(report))
    assert "a: took it (2 instance(s))" in text and "b: refused: HTTP 422: invalid" in text


def test_status_of_an_older_dead_letter_shows_no_destinations(tmp_path):
    folder = tmp_path / "dead" / STUDY
    (folder / "instances").mkdir(parents=True)
    (folder / "reason.txt").write_text("HTTP 422: old\n")
    [study] = build_report(tmp_path / "spool", tmp_path / "dead", now=0).dead_lettered
    assert study.reason == "HTTP 422: old" and study.delivered == {} and study.refused == {}


def test_requeue_says_which_destinations_will_be_sent_the_study_again(tmp_path, clock, capsys):
    # The spool keeps no per-destination record: a requeued study goes to every destination.
    dead_letter_one_refused(tmp_path, clock)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nspool_dir = "{tmp_path / "spool"}"\ndead_letter_dir = "{tmp_path / "dead"}"\n')
    assert cli_main(["retry", "-c", str(config), "--requeue", STUDY]) == 0
    assert "note: a already took it; the node sends it there again" in capsys.readouterr().out
    assert not DeadLetterBox(tmp_path / "dead").contains(STUDY)
    assert len(list((tmp_path / "spool" / STUDY).glob("*.dcm"))) == 2
