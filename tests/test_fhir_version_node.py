"""`serve` checks the FHIR server's version (GET metadata) before it listens: against the real
validating engine (an R4 server), R5 is refused at start in one line; R4 works as before."""

from __future__ import annotations

import pytest
import requests

from tests.fhir_engine import fhir_engine, fhir_engine_process  # noqa: F401 (fixtures)
from tests.scp_node import NodeProcess
from tests.test_cli_user_errors import assert_one_line_error, run

pytestmark = pytest.mark.interop


def test_the_engine_answers_metadata_with_an_r4_capability_statement(fhir_engine):
    answer = requests.get(f"{fhir_engine.base_url}/metadata", headers={"Accept": "application/fhir+json"}, timeout=30)
    assert answer.status_code == 200
    assert (answer.json()["resourceType"], answer.json()["fhirVersion"]) == ("CapabilityStatement", "4.0.1")


def test_serve_for_r5_refuses_an_r4_server_at_start(tmp_path, fhir_engine):
    result = run("serve", "--port", "0", "--bind", "127.0.0.1", "-od", tmp_path / "out", "--spool-dir",
                 tmp_path / "spool", "--dead-letter-dir", tmp_path / "dl", "--fhir-url", fhir_engine.base_url,
                 "--fhir-version", "R5", cwd=tmp_path)
    assert_one_line_error(result, "speaks FHIR R4", "fhir.version is R5")
    assert " ready on " not in result.stderr


def test_serve_for_r4_starts_against_the_r4_engine(tmp_path, fhir_engine):
    node = NodeProcess(tmp_path, "--fhir-url", fhir_engine.base_url, "--fhir-version", "R4").start()
    try:
        assert "FHIR version" not in node.log()
    finally:
        assert node.stop() == 0


def test_serve_keeps_serving_when_the_server_cannot_be_reached_at_start(tmp_path, refusing_port):
    node = NodeProcess(tmp_path, "--fhir-url", f"http://127.0.0.1:{refusing_port.port}", "--fhir-version", "R5")
    node.start()
    try:
        assert "its FHIR version cannot be read now" in node.log()
    finally:
        assert node.stop() == 0
