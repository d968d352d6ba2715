"""config/dicom-fhir-scp.service: the example unit runs the node as the README says."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from scp.cli import build_parser
from scp.config import FhirConfig

from tests.conftest import REPO, require_tool

pytestmark = pytest.mark.interop  # systemd-analyze, an external tool (tests/run.d/systemd.sh installs it)

UNIT = REPO / "config" / "dicom-fhir-scp.service"


def settings(text: str) -> dict[str, list[str]]:
    """Active (uncommented) Key=value lines, by key."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_serves_with_the_etc_config_from_the_state_directory():
    unit = settings(UNIT.read_text())
    argv = shlex.split(unit["ExecStart"][0])
    assert argv[1:] == ["serve", "--config", "/etc/dicom-fhir-scp/dicom-fhir-scp.toml"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert unit["WorkingDirectory"] == ["/var/lib/dicom-fhir-scp"]
    assert "/var/lib/dicom-fhir-scp" in unit["ReadWritePaths"][0].split()


def test_the_unit_runs_as_a_dedicated_user_without_privileges():
    unit = settings(UNIT.read_text())
    assert unit["User"] == ["dicom-fhir-scp"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["PrivateTmp"] == ["yes"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert "AmbientCapabilities" not in unit  # only for port 104, commented out
    assert "#AmbientCapabilities=CAP_NET_BIND_SERVICE" in UNIT.read_text()


def test_the_unit_restarts_on_failure_and_gives_a_graceful_stop_time_for_a_request_in_flight():
    unit = settings(UNIT.read_text())
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert int(unit["TimeoutStopSec"][0]) > FhirConfig().timeout


def test_systemd_accepts_every_line_of_the_unit(tmp_path):
    """systemd-analyze reports unknown keys and bad values; the executable path is ours.

    Outside CI a missing systemd-analyze skips this test; with CI=true it fails (require_tool).
    """
    node = shutil.which("dicom-fhir-scp") or str(Path(shutil.which("python3") or "/usr/bin/python3"))
    text = UNIT.read_text().replace("/opt/dicom-fhir-scp/bin/dicom-fhir-scp", node)
    assert text != UNIT.read_text()
    analyze = require_tool("systemd-analyze")
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.stdout + result.stderr == ""


def test_the_units_stop_timeout_outlasts_the_nodes_stop_grace():
    from scp.config import NodeConfig

    unit = settings(UNIT.read_text())
    assert int(unit["TimeoutStopSec"][0]) > NodeConfig().stop_grace + 2
