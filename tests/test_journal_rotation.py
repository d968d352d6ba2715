"""deliveries.jsonl is rotated by size (node.journal_max_bytes) to deliveries.jsonl.1; readers see across it."""

from __future__ import annotations

import json

import pytest

from mapping.errors import ConfigurationError
from scp.config import NodeConfig, load_config
from scp.store.journal import DEFAULT_MAX_BYTES, Journal, recent
from scp.store.layout import JOURNAL, rotated_journal


def line_size(journal: Journal) -> int:
    journal.append("1.2.3", 1, "delivered", {"disk": "wrote"})
    size = journal.path.stat().st_size
    journal.path.unlink()
    return size


def test_the_default_limit_is_10_mib():
    assert NodeConfig().journal_max_bytes == DEFAULT_MAX_BYTES == 10 * 1024 * 1024


def test_the_limit_is_a_config_key_with_its_environment_variable():
    assert load_config(None, {"DICOM_FHIR_SCP_NODE_JOURNAL_MAX_BYTES": "65536"}).node.journal_max_bytes == 65536


def test_a_limit_too_small_to_hold_a_record_is_refused():
    with pytest.raises(ConfigurationError, match="node.journal_max_bytes"):
        NodeConfig(journal_max_bytes=100)


def test_the_rotated_file_is_named_deliveries_jsonl_1():
    assert rotated_journal() == f"{JOURNAL}.1" == "deliveries.jsonl.1"


def test_a_line_that_would_pass_the_limit_goes_to_a_fresh_file(tmp_path):
    journal = Journal.in_spool(tmp_path, lambda: 0.0, max_bytes=4096)
    size = line_size(journal)
    journal.max_bytes = 3 * size
    for number in range(4):
        journal.append(f"1.2.{number}", 1, "delivered", {"disk": "wrote"})
    current = [json.loads(line)["study"] for line in (tmp_path / JOURNAL).read_text().splitlines()]
    rotated = [json.loads(line)["study"] for line in (tmp_path / "deliveries.jsonl.1").read_text().splitlines()]
    assert (rotated, current) == (["1.2.0", "1.2.1", "1.2.2"], ["1.2.3"])
    assert (tmp_path / JOURNAL).stat().st_size <= journal.max_bytes


def test_only_one_rotated_file_is_kept(tmp_path):
    journal = Journal.in_spool(tmp_path, lambda: 0.0)
    journal.max_bytes = line_size(journal)  # every line rotates the one before
    for number in range(5):
        journal.append(f"1.2.{number}", 1, "delivered")
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL, "deliveries.jsonl.1"]
    assert json.loads((tmp_path / "deliveries.jsonl.1").read_text())["study"] == "1.2.3"


def test_recent_reads_on_into_the_rotated_file(tmp_path):
    journal = Journal.in_spool(tmp_path, lambda: 0.0)
    journal.max_bytes = 3 * line_size(journal)
    for number in range(5):
        journal.append(f"1.2.{number}", 1, "delivered")
    entries, problems = recent(tmp_path / JOURNAL, 4)
    assert problems == []
    assert [e.study for e in entries] == ["1.2.1", "1.2.2", "1.2.3", "1.2.4"]


def test_recent_reads_the_rotated_file_when_the_current_one_is_not_there_yet(tmp_path):
    (tmp_path / "deliveries.jsonl.1").write_text(json.dumps(
        {"time": "2027-01-01T00:00:00+00:00", "study": "1.2.9", "instances": 1, "result": "delivered",
         "sinks": {}}) + "\n")
    entries, _ = recent(tmp_path / JOURNAL, 10)
    assert [e.study for e in entries] == ["1.2.9"]


def test_recent_without_any_journal_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        recent(tmp_path / JOURNAL, 10)


def test_status_lists_the_last_deliveries_across_a_rotation(tmp_path):
    from scp.ops.status import build_report

    journal = Journal.in_spool(tmp_path, lambda: 0.0)
    journal.max_bytes = 2 * line_size(journal)
    for number in range(3):
        journal.append(f"1.2.{number}", 1, "delivered")
    report = build_report(tmp_path, tmp_path / "dead-letter", now=0.0, recent=3)
    assert [d.study for d in report.deliveries] == ["1.2.0", "1.2.1", "1.2.2"]
