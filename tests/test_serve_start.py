"""How `serve` starts: PORT as storescp takes it, "ready" only after every listener, and
warnings for settings whose absence costs data."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.clocks import wait_for
from tests.conftest import REPO
from tests.scp_node import LISTENING, NodeProcess

pytestmark = pytest.mark.interop

TIMEZONE_WARNING = "mapping.timezone is not set"
SYSTEM_WARNING = "mapping.patient_identifier_system is not set"


def test_ready_is_logged_after_the_dicom_and_the_operations_listeners(tmp_path):
    node = NodeProcess(tmp_path, config="[operations]\nhttp_enabled = true\nhttp_port = 0\n").start()
    try:
        log = node.log()
        ready = log.index(" ready on ")
        assert log.index("listening on ") < ready
        assert log.index("operations endpoint on http://") < ready
        with urllib.request.urlopen(f"http://127.0.0.1:{node.ops_port()}/healthz", timeout=5) as answer:
            assert answer.status == 200
    finally:
        assert node.stop() == 0


def test_the_port_may_be_given_as_an_argument_as_storescp_takes_it(tmp_path):
    """`serve PORT`: here PORT 0, without --port (so the port the node bound is not 11112)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_FHIR_SCP_")}
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "scp", "serve", "--bind", "127.0.0.1", "0"],
                                   cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                                   stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        wait_for(lambda: " ready on " in log_path.read_text() or process.poll() is not None, 30, "the node")
        listening = LISTENING.search(log_path.read_text())
        assert listening and int(listening[2]) not in (0, 11112), log_path.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_the_same_port_given_twice_is_fine(tmp_path):
    node = NodeProcess(tmp_path, "0").start()  # the harness gives --port 0 as well
    try:
        assert node.port > 0
    finally:
        node.stop()


def test_serve_warns_what_a_missing_time_zone_and_patient_identifier_system_cost(tmp_path):
    node = NodeProcess(tmp_path).start()
    node.stop()
    log = node.log()
    [timezone] = [line for line in log.splitlines() if TIMEZONE_WARNING in line]
    assert "WARNING" in timezone and "date only" in timezone
    [system] = [line for line in log.splitlines() if SYSTEM_WARNING in line]
    assert "WARNING" in system and "cannot be told apart" in system


def test_no_warning_when_time_zone_and_system_are_configured(tmp_path):
    node = NodeProcess(tmp_path, config='[mapping]\ntimezone = "Europe/Berlin"\n'
                                         'patient_identifier_system = "urn:oid:1.2.3.4"\n').start()
    node.stop()
    assert TIMEZONE_WARNING not in node.log() and SYSTEM_WARNING not in node.log()


def test_the_issuer_of_patient_id_counts_as_a_system(tmp_path):
    node = NodeProcess(tmp_path, config="[mapping]\nuse_issuer_of_patient_id = true\n").start()
    node.stop()
    assert SYSTEM_WARNING not in node.log()


def test_ready_comes_last_in_the_start_up_log(tmp_path):
    node = NodeProcess(tmp_path).start()
    node.stop()
    start_up = node.log()[:node.log().index(" ready on ")]
    assert re.search(r"listening on \S+:\d+ as FHIRSCP", start_up)
