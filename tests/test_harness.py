"""The test suite's own rules: peers are marked interop, strict_pydicom is strict, refusing_port refuses."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

HERE = Path(__file__).resolve().parent

# What starts or talks to a real peer: the FHIR engine, the node subprocess, Orthanc's driver,
# or an external tool looked up with require_tool (dcmtk, Orthanc, unshare, ...).
PEER_HELPERS = {"tests.fhir_engine", "tests.scp_node", "tests.orthanc_push"}


def uses_a_peer(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in PEER_HELPERS:
            return True
        if isinstance(node, ast.Import) and any(alias.name in PEER_HELPERS for alias in node.names):
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require_tool":
            return True
        if isinstance(node, ast.Constant) and node.value in PEER_HELPERS:  # python -m tests.orthanc_push
            return True
    return False


def module_marks(tree: ast.Module) -> set[str]:
    """Names of the marks in the module's `pytestmark = ...` (pytest.mark.NAME, or a list of them)."""
    marks = set()
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in statement.targets):
            for node in ast.walk(statement.value):
                if isinstance(node, ast.Attribute) and getattr(node.value, "attr", None) == "mark":
                    marks.add(node.attr)
    return marks


def test_every_test_module_that_talks_to_a_real_peer_is_marked_interop():
    peers, unmarked = [], []
    for path in sorted(HERE.glob("test_*.py")):
        if path.name == Path(__file__).name:  # names the helpers without using them
            continue
        tree = ast.parse(path.read_text(), str(path))
        if uses_a_peer(tree):
            peers.append(path.name)
            if "interop" not in module_marks(tree):
                unmarked.append(path.name)
    # The detection itself must see the modules known to start peers, or this test proves nothing.
    assert {"test_fhir_engine.py", "test_orthanc.py", "test_scp_node.py", "test_fhir_node.py"} <= set(peers)
    assert unmarked == [], f"add `pytestmark = pytest.mark.interop` to {unmarked}"


def test_strict_pydicom_refuses_an_invalid_value(strict_pydicom):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with pytest.raises(ValueError, match="Invalid value for VR DA"):
        ds.StudyDate = "2024-01-01"


def test_nothing_listens_on_a_refusing_port(refusing_port):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", refusing_port.port), timeout=5)
