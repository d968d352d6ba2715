"""The node in-process against the FHIR engine: a pynetdicom sender, the node's journal, the
engine's resources (shared by the FHIR node and destination tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from scp.config import load_config
from scp.node import Node
from scp.ops.metrics import Metrics
from tests.dicomgen import GeneratedStudy
from tests.fhir_engine import FhirEngine
from tests.scu import keep_responses

MRN = "http://hospital.example/mrn"


def send(port: int, study: GeneratedStudy) -> None:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="FHIRSCP"))
    assert assoc.is_established
    try:
        for path in study.files:
            status = assoc.send_c_store(path)
            assert status and status.Status == 0x0000, status
    finally:
        assoc.release()


def journal(tmp_path: Path) -> list[dict]:
    path = tmp_path / "spool" / "deliveries.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def delivered(tmp_path: Path) -> list[dict]:
    return [line for line in journal(tmp_path) if line["result"].startswith("delivered")]


@pytest.fixture
def node_factory():
    nodes: list[Node] = []

    def start(config_path: Path) -> Node:
        node = Node(load_config(config_path), metrics=Metrics())
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop(grace=2)


def only(resources: list[dict]) -> dict:
    assert len(resources) == 1, f"expected one resource, the server holds {len(resources)}"
    return resources[0]


def duplicate_patients(engine: FhirEngine, patient_id: str) -> list[str]:
    """Two master records with one MRN: a server-side data error a conditional create cannot resolve."""
    patient = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": patient_id}]}
    return [requests.post(f"{engine.base_url}/Patient", json=patient, timeout=30,
                          headers={"Content-Type": "application/fhir+json"}).json()["id"] for _ in range(2)]
