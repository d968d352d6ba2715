"""A node configured by the environment alone (no file, no flags): the container/systemd way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.clocks import wait_for
from tests.conftest import REPO
from tests.scp_node import LISTENING, OPS_LISTENING

pytestmark = pytest.mark.interop


def test_an_environment_only_node_serves_dicom_and_metrics(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_FHIR_SCP_")}
    env.update({"DICOM_FHIR_SCP_NODE_PORT": "0", "DICOM_FHIR_SCP_NODE_BIND": "127.0.0.1",
                "DICOM_FHIR_SCP_NODE_SPOOL_DIR": str(tmp_path / "spool"),
                "DICOM_FHIR_SCP_NODE_OUTPUT_DIR": str(tmp_path / "out"),
                "DICOM_FHIR_SCP_NODE_DEAD_LETTER_DIR": str(tmp_path / "dead-letter"),
                "DICOM_FHIR_SCP_OPERATIONS_HTTP_ENABLED": "true", "DICOM_FHIR_SCP_OPERATIONS_HTTP_PORT": "0"})
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "scp", "serve"], cwd=tmp_path, env={
            **env, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        log = lambda: log_path.read_text(errors="replace")  # noqa: E731
        wait_for(lambda: " ready on " in log() or process.poll() is not None, 30, "the node to start")
        assert process.poll() is None, log()
        assert LISTENING.search(log()), log()
        ops = OPS_LISTENING.search(log())
        assert ops, log()
        with urllib.request.urlopen(f"http://127.0.0.1:{ops[2]}/metrics", timeout=5) as answer:
            assert answer.status == 200
            # Counted per calling AE: before any sender the family is there, without samples.
            assert "# TYPE dicom_fhir_scp_instances_received_total counter" in answer.read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
