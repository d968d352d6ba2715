"""Operations against the running node (`serve` in a subprocess): `status` and the HTTP endpoint
follow a study from the spool to its delivery, across a graceful restart."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage

from tests.clocks import wait_for
from tests.conftest import REPO
from tests.dicomgen import generate_study
from tests.scp_node import NodeProcess
from tests.scu import keep_responses

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "MRN-4711"


def send(node: NodeProcess, files) -> list[int]:
    ae = AE(ae_title="PYSCU")
    ae.requested_contexts = [build_context(CTImageStorage)]
    assoc = keep_responses(ae.associate("127.0.0.1", node.port, ae_title=node.ae_title))
    assert assoc.is_established
    try:
        return [assoc.send_c_store(str(path)).Status for path in files]
    finally:
        assoc.release()


def metrics(port: int) -> dict[str, float]:
    """Every sample's value, summed over its labels (a labelled counter starts with no sample: 0)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            values.setdefault(family.name + "_total", 0.0)
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def status(node: NodeProcess, *extra: str) -> str:
    result = subprocess.run([sys.executable, "-m", "scp", "status", "--spool-dir", str(node.spool),
                             "--dead-letter-dir", str(node.dead_letter), *extra],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_and_metrics_follow_a_study_from_the_spool_to_its_delivery(tmp_path):
    study = generate_study(tmp_path / "in", 3, 1, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    node = NodeProcess(tmp_path / "node", idle_timeout=120,
                       config="[operations]\nhttp_enabled = true\nhttp_port = 0\n").start()
    try:
        port = node.ops_port()
        assert send(node, study.files) == [0, 0, 0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
        waiting = wait_for(lambda: (m := metrics(port))["dicom_fhir_scp_associations_total"] == 1 and m,
                           what="the association to be counted")
        assert waiting["dicom_fhir_scp_instances_received_total"] == 3
        assert waiting["dicom_fhir_scp_instances_failed_total"] == 0
        assert waiting["dicom_fhir_scp_spool_studies"] == 1
        assert waiting["dicom_fhir_scp_studies_completed_total"] == 0

        report = json.loads(status(node, "--json"))
        assert [(w["study"], w["instances"]) for w in report["waiting"]] == [(study.study_uid, 3)]
        assert report["recent_deliveries"] == []
        text = status(node)
        assert study.study_uid in text and "Doe" not in text and PATIENT_ID not in text

        assert node.stop() == 0  # SIGTERM: the study stays in the spool
        assert json.loads(status(node, "--json"))["waiting"][0]["study"] == study.study_uid

        node.start(idle_timeout=0.5)
        port = node.ops_port()  # port 0 again: the restarted node bound another one
        node.wait_for_deliveries(study.study_uid)
        done = wait_for(lambda: (m := metrics(port))["dicom_fhir_scp_spool_studies"] == 0 and m,
                        what="the spool to empty")
        assert done["dicom_fhir_scp_studies_completed_total"] == 1
        assert done["dicom_fhir_scp_deliveries_ok_total"] == 1
        assert done["dicom_fhir_scp_deliveries_failed_total"] == 0

        report = json.loads(status(node, "--json"))
        assert report["waiting"] == []
        [delivery] = report["recent_deliveries"]
        assert (delivery["study"], delivery["instances"]) == (study.study_uid, 3)
        assert delivery["result"].startswith("delivered")
    finally:
        node.stop()
