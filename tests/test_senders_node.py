"""Several sites, one node: the node in a subprocess, dcmtk's storescu as two senders (CT_A, CT_B),
the validating FHIR engine. Each study is mapped with its sender's [[senders]] settings, a study whose
senders disagree on identity is set aside, and a spool file of the current release (no (0002,0026))
is delivered after the upgrade."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from scp.cli import main as cli_main
from scp.receive.dataset import header_file, parse_received
from scp.store.part10 import EXPLICIT_LE
from scp.store.spool import FileSpool
from tests.conftest import require_tool
from tests.dicomgen import GeneratedStudy, generate_study
from tests.fhir_engine import FhirEngine, fhir_engine, fhir_engine_process  # noqa: F401
from tests.scp_node import NodeProcess

pytestmark = pytest.mark.interop

SYSTEM_A, SYSTEM_B, GLOBAL = "urn:oid:1.2.1", "urn:oid:1.2.2", "urn:oid:1.2.999"
PATIENT_ID = "4711"  # both sites have a patient 4711: two people


def config(engine: FhirEngine) -> str:
    return f"""
[mapping]
patient_identifier_system = "{GLOBAL}"

[fhir]
url = "{engine.base_url}"
timeout = 10
max_backoff = 0.5

[[senders]]
ae_title = "CT_A"
addresses = ["127.0.0.1"]
patient_identifier_system = "{SYSTEM_A}"

[[senders]]
ae_title = "CT_B"
patient_identifier_system = "{SYSTEM_B}"
"""


@pytest.fixture
def node(tmp_path, fhir_engine):
    started: list[NodeProcess] = []

    def start(idle_timeout: float = 0.5) -> NodeProcess:
        process = NodeProcess(tmp_path / f"node{len(started)}", idle_timeout=idle_timeout,
                              config=config(fhir_engine)).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def storescu(node: NodeProcess, calling: str, *paths: Path) -> None:
    done = subprocess.run([require_tool("storescu"), "-aet", calling, "-aec", node.ae_title, "127.0.0.1",
                           str(node.port), *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def patients_by_system(engine: FhirEngine) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for patient in engine.resources("Patient"):
        for identifier in patient.get("identifier", []):
            found.setdefault(identifier["system"], []).append(identifier["value"])
    return found


def status_json(node: NodeProcess, capsys) -> dict:
    capsys.readouterr()
    assert cli_main(["status", "--spool-dir", str(node.spool), "--dead-letter-dir", str(node.dead_letter),
                     "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_two_sites_with_the_same_patient_id_become_two_patients_with_their_systems(tmp_path, node, fhir_engine):
    scp = node()
    a = generate_study(tmp_path / "a", 3, 1, patient_id=PATIENT_ID)
    b = generate_study(tmp_path / "b", 2, 1, patient_id=PATIENT_ID)
    storescu(scp, "CT_A", *a.files)
    storescu(scp, "CT_B", *b.files)
    [line_a] = scp.wait_for_deliveries(a.study_uid)
    [line_b] = scp.wait_for_deliveries(b.study_uid)

    assert line_a["senders"] == ["CT_A"] and line_b["senders"] == ["CT_B"]
    assert patients_by_system(fhir_engine) == {SYSTEM_A: [PATIENT_ID], SYSTEM_B: [PATIENT_ID]}
    studies = fhir_engine.resources("ImagingStudy")
    assert len(studies) == 2 and len({s["subject"]["reference"] for s in studies}) == 2


def test_a_study_split_across_senders_with_different_identity_settings_is_set_aside(
        tmp_path, node, fhir_engine, capsys):
    scp = node(idle_timeout=600)  # both halves in the spool before the study completes
    study = generate_study(tmp_path / "s", 4, 1, patient_id=PATIENT_ID)
    storescu(scp, "CT_A", *study.files[:2])
    storescu(scp, "CT_B", *study.files[2:])
    spooled = [pydicom.dcmread(p).file_meta for p in sorted((scp.spool / study.study_uid).glob("*.dcm"))]
    assert {m.SourceApplicationEntityTitle for m in spooled} == {"CT_A", "CT_B"}
    assert all(m.SourcePresentationAddress.startswith("dicom://127.0.0.1:") for m in spooled)
    waiting = status_json(scp, capsys)["waiting"]
    assert [w["study"] for w in waiting] == [study.study_uid] and waiting[0]["senders"]

    assert scp.stop() == 0
    scp.start(idle_timeout=0.5)
    [line] = scp.wait_for_deliveries(study.study_uid)

    reason = (scp.dead_letter / study.study_uid / "reason.txt").read_text().splitlines()[0]
    assert reason.startswith("SenderConflict: ") and "CT_A" in reason and "CT_B" in reason
    assert "patient_identifier_system" in reason and PATIENT_ID not in reason
    assert line["result"].startswith("dead-lettered: SenderConflict") and sorted(line["senders"]) == ["CT_A", "CT_B"]
    assert fhir_engine.resources("ImagingStudy") == [] and fhir_engine.resources("Patient") == []
    [dead] = status_json(scp, capsys)["dead_lettered"]
    assert dead["study"] == study.study_uid and set(dead["senders"]) <= {"CT_A", "CT_B"} and dead["senders"]


def spool_as_the_current_release(spool_dir: Path, study: GeneratedStudy, calling: str) -> None:
    """Spool files as the release before this one wrote them: header_file without an address."""
    spool = FileSpool(spool_dir)
    for path in study.files:
        raw = path.read_bytes()
        meta_end = 144 + int.from_bytes(raw[140:144], "little")
        instance = parse_received(raw[meta_end:], EXPLICIT_LE)
        spool.store(instance.study_uid, instance.sop_uid, header_file(instance, calling))


def test_spool_files_of_the_current_release_are_delivered_after_the_upgrade(tmp_path, node, fhir_engine):
    b = generate_study(tmp_path / "b", 2, 1, patient_id=PATIENT_ID)
    a = generate_study(tmp_path / "a", 2, 1, patient_id=PATIENT_ID)
    assert pydicom.dcmread(b.files[0]).file_meta.TransferSyntaxUID == EXPLICIT_LE
    root = tmp_path / "node0"
    spool_as_the_current_release(root / "spool", b, "CT_B")  # CT_B's entry names no address: it matches
    spool_as_the_current_release(root / "spool", a, "CT_A")  # CT_A's entry is paired with 127.0.0.1: it does not
    spooled = next((root / "spool" / b.study_uid).glob("*.dcm"))
    assert "SourcePresentationAddress" not in pydicom.dcmread(spooled).file_meta

    scp = node()
    [line_b] = scp.wait_for_deliveries(b.study_uid)
    [line_a] = scp.wait_for_deliveries(a.study_uid)

    assert line_b["result"] == "delivered" and line_b["senders"] == ["CT_B"]
    assert line_a["result"] == "delivered" and line_a["senders"] == ["CT_A"]
    assert patients_by_system(fhir_engine) == {SYSTEM_B: [PATIENT_ID], GLOBAL: [PATIENT_ID]}
