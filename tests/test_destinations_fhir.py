"""Two FHIR destinations, two real engines: the node delivers a study once to each, whatever
the other does (down, refusing), and `retry` sends it only where it was refused.

Nothing is mocked: the node (scp.node.Node) with [fhir] (destination "fhir") and
[fhir.destinations.site2], DICOM in over the network, tests/fhir_server twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from scp.cli import main as cli_main
from tests.clocks import wait_for
from tests.dicomgen import generate_study
from tests.fhir_engine import FhirEngine, fhir_engine, fhir_engine_process, start_or_skip  # noqa: F401
from tests.fhir_nodes import MRN, delivered, duplicate_patients, node_factory, only, send  # noqa: F401

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]


def write_config(tmp_path: Path, fhir_url: str, site2_url: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
port = 0
bind = "127.0.0.1"
spool_dir = "{tmp_path / 'spool'}"
dead_letter_dir = "{tmp_path / 'dead-letter'}"
output_dir = "{tmp_path / 'fhir-output'}"
idle_timeout = 0.3

[mapping]
patient_identifier_system = "{MRN}"

[fhir]
url = "{fhir_url}"
timeout = 5
max_backoff = 0.5

[fhir.destinations.site2]
url = "{site2_url}"
timeout = 5
""", encoding="utf-8")
    return path


def posts(engine: FhirEngine) -> list[tuple[str, str, int]]:
    return [entry for entry in engine.request_log() if entry[0] in ("POST", "PUT")]


def test_each_destination_has_its_own_readiness_check(tmp_path, node_factory, fhir_engine, refusing_port):
    node = node_factory(write_config(tmp_path, fhir_engine.base_url, f"http://127.0.0.1:{refusing_port.port}"))
    checks = node.readiness.report()["checks"]
    assert checks["fhir"]["ok"] and not checks["site2"]["ok"]


def test_a_study_is_delivered_once_to_each_destination_while_one_is_down_then_up(
        tmp_path, node_factory, fhir_engine, refusing_port):
    port = refusing_port.port
    node = node_factory(write_config(tmp_path, fhir_engine.base_url, f"http://127.0.0.1:{port}"))
    study = generate_study(tmp_path / "in", 4, 2)

    send(node.port, study)
    wait_for(lambda: node.metrics.snapshot().get("deliveries_failed", 0) >= 3, 30, "failed attempts at site2")
    assert only(fhir_engine.resources("ImagingStudy"))["numberOfInstances"] == 4
    taken = fhir_engine.request_log()
    assert len(posts(fhir_engine)) == 1 and node.spool.depth() == 1  # "fhir" took it; it waits for site2

    refusing_port.release()  # the second engine takes the port site2 has been refused on
    with start_or_skip(port=port) as site2:
        wait_for(lambda: delivered(tmp_path), 30, "the delivery to site2")
        assert only(site2.resources("ImagingStudy"))["numberOfInstances"] == 4
        assert len(posts(site2)) == 1
    assert fhir_engine.request_log() == taken  # never asked again
    [line] = delivered(tmp_path)
    assert set(line["sinks"]) == {"disk", "fhir", "site2"} and node.spool.depth() == 0


def test_a_study_one_destination_refuses_is_set_aside_for_it_only_and_retry_sends_it_there_alone(
        tmp_path, node_factory, fhir_engine, capsys):
    study = generate_study(tmp_path / "in", 3, 1, patient_id="MRN-78")
    with start_or_skip() as site2:
        _, second = duplicate_patients(site2, "MRN-78")  # site2 refuses: two master records for one MRN
        config = write_config(tmp_path, fhir_engine.base_url, site2.base_url)
        node = node_factory(config)
        send(node.port, study)
        folder = tmp_path / "dead-letter" / study.study_uid
        wait_for(lambda: (folder / "reason.txt").exists(), 30, "the study in the dead-letter folder")

        assert set(json.loads((folder / "delivered.json").read_text())) == {"disk", "fhir"}
        assert "412" in (folder / "destinations" / "site2" / "reason.txt").read_text()
        assert only(fhir_engine.resources("ImagingStudy"))["numberOfInstances"] == 3
        assert site2.resources("ImagingStudy") == []
        assert cli_main(["status", "-c", str(config), "--json"]) == 0
        [shown] = json.loads(capsys.readouterr().out)["dead_lettered"]
        assert set(shown["delivered"]) == {"disk", "fhir"} and "412" in shown["refused"]["site2"]

        taken = fhir_engine.request_log()
        requests.delete(f"{site2.base_url}/Patient/{second}", timeout=30)  # the duplicates merged
        assert cli_main(["retry", "-c", str(config), study.study_uid]) == 0
        assert only(site2.resources("ImagingStudy"))["numberOfInstances"] == 3
    assert fhir_engine.request_log() == taken  # retry never sent it again where it was taken
    assert not folder.exists()
