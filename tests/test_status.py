"""`dicom-fhir-scp status`: the report built from the documented on-disk layout (scp/__init__.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scp.cli import main
from scp.ops.status import build_report, format_age, format_report
from scp.store.journal import tail_lines

NOW = 1_800_000_000.0
STUDY_A = "1.2.826.0.1.3680043.8.498.1"
STUDY_B = "1.2.826.0.1.3680043.8.498.2"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN-4711"


def spool_instance(spool: Path, study: str, sop: str, mtime: float) -> Path:
    """An instance file as the node leaves it; its content names a patient, which status must never show."""
    path = spool / study / f"{sop}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + f"{PATIENT_NAME} {PATIENT_ID}".encode())
    os.utime(path, (mtime, mtime))
    return path


def dead_letter(root: Path, study: str, reason: str, when: float, instances: int = 2) -> Path:
    folder = root / study
    (folder / "instances").mkdir(parents=True)
    for i in range(instances):
        (folder / "instances" / f"1.2.3.{i}.dcm").write_bytes(b"header")
    (folder / "bundle.json").write_text("{}")
    (folder / "reason.txt").write_text(reason)
    os.utime(folder / "reason.txt", (when, when))
    return folder


def delivery_line(study: str, *, time="2027-01-15T08:00:00+00:00", instances=3, result="delivered",
                  sinks=None) -> str:
    record = {"time": time, "study": study, "instances": instances, "result": result,
              "sinks": {"disk": "written"} if sinks is None else sinks}
    return json.dumps(record) + "\n"


@pytest.fixture
def layout(tmp_path):
    spool, dead = tmp_path / "spool", tmp_path / "dead-letter"
    spool.mkdir()
    dead.mkdir()
    return spool, dead


def test_a_waiting_study_shows_its_instances_and_idle_time_since_the_last_instance(layout):
    spool, dead = layout
    spool_instance(spool, STUDY_A, "1.1", NOW - 100)
    spool_instance(spool, STUDY_A, "1.2", NOW - 40)
    spool_instance(spool, STUDY_A, "1.3", NOW - 70)
    [w] = build_report(spool, dead, NOW).waiting
    assert (w.study, w.instances, w.last_instance, w.idle_seconds) == (STUDY_A, 3, NOW - 40, 40)


def test_waiting_studies_are_listed_oldest_last_instance_first(layout):
    spool, dead = layout
    spool_instance(spool, STUDY_A, "1.1", NOW - 5)
    spool_instance(spool, STUDY_B, "2.1", NOW - 500)
    assert [w.study for w in build_report(spool, dead, NOW).waiting] == [STUDY_B, STUDY_A]


def test_the_delivery_log_temporary_files_and_empty_folders_are_not_studies(layout):
    spool, dead = layout
    spool_instance(spool, STUDY_A, "1.1", NOW - 5)
    (spool / STUDY_A / ".1.2.dcm.tmp").write_bytes(b"partial")
    (spool / STUDY_A / "1.3.dcm.tmp").write_bytes(b"partial")
    (spool / ".tmp").mkdir()
    (spool / STUDY_B).mkdir()
    (spool / "deliveries.jsonl").write_text("")
    [w] = build_report(spool, dead, NOW).waiting
    assert (w.study, w.instances) == (STUDY_A, 1)


def test_a_dead_lettered_study_shows_the_first_line_of_its_reason_and_when(layout):
    spool, dead = layout
    dead_letter(dead, STUDY_A, "FHIR server rejected the bundle: HTTP 422\n{\"resourceType\": ...}\n", NOW - 3600)
    [d] = build_report(spool, dead, NOW).dead_lettered
    assert (d.study, d.reason, d.since, d.instances) == (
        STUDY_A, "FHIR server rejected the bundle: HTTP 422", NOW - 3600, 2)


def test_a_study_the_node_set_aside_is_read_as_the_node_wrote_it(layout):
    from scp.store.dead_letter import DeadLetterBox
    from scp.store.spool import FileSpool

    spool_dir, dead = layout
    spool = FileSpool(spool_dir)
    for sop in ("1.1", "1.2", "1.3"):
        spool.store(STUDY_A, sop, [b"header bytes"])
    versions = {i.sop_uid: i.version for i in spool.read(STUDY_A, ["1.1", "1.2", "1.3"])}
    DeadLetterBox(dead).put(STUDY_A, "PatientID differs between instances", details="series 1 vs 2",
                            documents={"bundle.json": b"{}"}, spool=spool, versions=versions)
    report = build_report(spool_dir, dead, NOW)
    assert report.waiting == ()
    [d] = report.dead_lettered
    assert (d.study, d.reason, d.instances) == (STUDY_A, "PatientID differs between instances", 3)


def test_a_dead_lettered_study_without_reason_file_is_still_listed(layout):
    spool, dead = layout
    (dead / STUDY_B / "instances").mkdir(parents=True)
    [d] = build_report(spool, dead, NOW).dead_lettered
    assert d.study == STUDY_B and "reason.txt missing" in d.reason


def test_recent_deliveries_are_the_last_n_lines_in_order(layout):
    spool, dead = layout
    with open(spool / "deliveries.jsonl", "w") as fh:
        for i in range(25):
            fh.write(delivery_line(f"1.2.3.{i}", instances=i))
    deliveries = build_report(spool, dead, NOW, recent=10).deliveries
    assert [d.study for d in deliveries] == [f"1.2.3.{i}" for i in range(15, 25)]
    assert deliveries[-1].instances == 24


def test_a_delivery_shows_its_result_then_each_sinks_on_one_line(layout):
    spool, dead = layout
    (spool / "deliveries.jsonl").write_text(delivery_line(
        STUDY_A, result="dead-lettered: HTTP 422\nOperationOutcome ...",
        sinks={"disk": "fhir-output/x.json", "fhir": "refused: HTTP 422\nbody"}))
    [d] = build_report(spool, dead, NOW).deliveries
    assert d.result == "dead-lettered: HTTP 422 (disk: fhir-output/x.json; fhir: refused: HTTP 422)"
    assert d.time == "2027-01-15T08:00:00+00:00"


def test_the_nodes_own_journal_lines_are_read(layout):
    from scp.store.journal import Journal
    from scp.store.layout import JOURNAL as DELIVERIES

    spool, dead = layout
    journal = Journal(spool / DELIVERIES, wall_clock=lambda: NOW)
    journal.append(STUDY_A, 12, "delivered", {"disk": "written"}, series=2)
    journal.append(STUDY_B, 3, "dead-lettered: refused by the FHIR server", {})
    deliveries = build_report(spool, dead, NOW).deliveries
    assert [(d.study, d.instances, d.result) for d in deliveries] == [
        (STUDY_A, 12, "delivered (disk: written)"), (STUDY_B, 3, "dead-lettered: refused by the FHIR server")]
    assert deliveries[0].time.startswith("2027-01-15T")


def test_a_line_not_in_the_journals_format_is_noted_not_guessed(layout):
    # status reads what Journal.append writes; other shapes (an epoch time, another key) are noted.
    spool, dead = layout
    (spool / "deliveries.jsonl").write_text(delivery_line(STUDY_A, time=NOW) + delivery_line(STUDY_B)
                                            + json.dumps({"study_uid": STUDY_A, "ok": True}) + "\n")
    report = build_report(spool, dead, NOW)
    assert [d.study for d in report.deliveries] == [STUDY_B]
    assert len(report.notes) == 2
    assert "line 1 of the last 3" in report.notes[0] and "time: expected str, got float" in report.notes[0]
    assert "line 3 of the last 3" in report.notes[1]


def test_a_line_being_written_is_left_out_and_a_broken_line_is_noted(layout):
    spool, dead = layout
    (spool / "deliveries.jsonl").write_text(
        delivery_line(STUDY_A) + "not json\n" + delivery_line(STUDY_B) + '{"time": "2027-')
    report = build_report(spool, dead, NOW)
    assert [d.study for d in report.deliveries] == [STUDY_A, STUDY_B]
    assert len(report.notes) == 1 and "not a delivery record" in report.notes[0]


def test_a_missing_spool_gives_an_empty_report_with_a_note(tmp_path):
    report = build_report(tmp_path / "nope", tmp_path / "nada", NOW)
    assert (report.waiting, report.dead_lettered, report.deliveries) == ((), (), ())
    assert report.notes == (f"spool folder {tmp_path / 'nope'} does not exist "
                            "(nothing received yet, or another path configured)",)


def test_no_dead_letter_folder_is_normal_and_not_noted(layout, tmp_path):
    spool, _ = layout
    assert build_report(spool, tmp_path / "never-created", NOW).notes == ()


@pytest.mark.parametrize("block", [7, 64, 65536])
def test_tail_reads_only_complete_lines_from_the_end(tmp_path, block):
    log = tmp_path / "log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "\n  \npartial")
    assert tail_lines(log, 3, block=block) == ["line 97", "line 98", "line 99"]
    assert tail_lines(log, 500, block=block) == [f"line {i}" for i in range(100)]


def test_ages_read_like_a_person_would_write_them():
    assert [format_age(s) for s in (5, 65, 3725, 90061)] == ["5s", "1m05s", "1h02m", "1d01h"]


def test_the_text_report_names_studies_by_uid_and_never_shows_patient_data(layout):
    spool, dead = layout
    spool_instance(spool, STUDY_A, "1.1", NOW - 10)
    dead_letter(dead, STUDY_B, "rejected", NOW - 20)
    (spool / "deliveries.jsonl").write_text(delivery_line(STUDY_A))
    text = "\n".join(format_report(build_report(spool, dead, NOW)))
    assert text.count(STUDY_A) == 2 and STUDY_B in text and "rejected" in text
    assert PATIENT_NAME not in text and PATIENT_ID not in text and "Doe" not in text


def test_the_command_reads_folders_from_the_config_and_prints_json(layout, tmp_path, capsys):
    spool, dead = layout
    spool_instance(spool, STUDY_A, "1.1", NOW - 10)
    dead_letter(dead, STUDY_B, "PatientID differs from the server's", NOW - 20, instances=4)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nspool_dir = "{spool}"\ndead_letter_dir = "{dead}"\n')
    assert main(["status", "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [w["study"] for w in out["waiting"]] == [STUDY_A]
    assert out["waiting"][0]["instances"] == 1
    assert [(d["study"], d["instances"]) for d in out["dead_lettered"]] == [(STUDY_B, 4)]
    assert out["recent_deliveries"] == []


def test_command_line_folders_override_the_config(layout, tmp_path, capsys):
    spool, dead = layout
    spool_instance(spool, STUDY_A, "1.1", NOW - 10)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nspool_dir = "{tmp_path / "elsewhere"}"\n')
    assert main(["status", "-c", str(config), "--spool-dir", str(spool), "--dead-letter-dir", str(dead)]) == 0
    out = capsys.readouterr().out
    assert "Waiting in the spool" in out and STUDY_A in out
