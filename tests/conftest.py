"""Shared fixtures and the rule for tests that need real peers.

A test that needs dcmtk, Node or the FHIR engine calls `require_tool`: outside
CI a missing tool skips the test; with CI=true it fails, because CI must prove
the feature against the real peer.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pydicom
import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str) -> str:
    """Return the path of an executable, or skip (fail when CI=true) without it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (bash tests/run.sh installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


class RefusingPort:
    """A loopback port (bound with port 0) whose socket never listens.

    Connections to it are refused, and no other process can take the port while the
    socket is held; release() frees it for a server the test starts there later.
    """

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]

    def release(self) -> None:
        self._socket.close()


@pytest.fixture
def refusing_port():
    reserved = RefusingPort()
    yield reserved
    reserved.release()


@pytest.fixture
def strict_pydicom():
    """pydicom raises on invalid values: for test modules whose datasets must be valid DICOM.

    Used by the modules that generate studies to send or convert (pytestmark). pydicom 3
    checks a value set on a data set with reading_validation_mode (writing_validation_mode
    only covers encoding, unknown tags and PN lengths), so both are RAISE. The modules
    that feed the mapping deliberately invalid values do not use it.
    """
    settings = pydicom.config.settings
    old = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = settings.reading_validation_mode = pydicom.config.RAISE
    yield
    settings.writing_validation_mode, settings.reading_validation_mode = old
