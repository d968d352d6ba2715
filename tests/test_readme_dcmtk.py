"""The README's dcmtk lines work as written: run each against a node, on pydicom's test files."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.conftest import REPO, require_tool
from tests.scp_node import NodeProcess

pytestmark = pytest.mark.interop

DICOMDIR_TESTS = Path(get_testdata_file("DICOMDIR")).parent  # 81 instances, 7 studies, 10 other files
INSTANCES, STUDIES = 81, 7
TOOLS = ("echoscu", "storescu", "dcmsend")


def readme_dcmtk_lines() -> list[str]:
    """Every dcmtk command line of the README's sh blocks (the TLS one needs certificates: not here)."""
    blocks = re.findall(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.split(" ")[0] in TOOLS and "+tls" not in line]


def as_run_here(line: str, port: int, folder: Path) -> list[str]:
    """The README's line with the node's address, its port and the folder put in."""
    argv = shlex.split(line)
    argv = ["127.0.0.1" if a == "dicom-node.example" else a for a in argv]
    argv = [str(port) if a == "11112" else a for a in argv]
    return [str(folder) if a == "/path/to/study" else a for a in argv]


def test_the_readme_has_the_lines_this_module_runs():
    tools = [line.split(" ")[0] for line in readme_dcmtk_lines()]
    assert {"echoscu", "storescu", "dcmsend"} <= set(tools)
    assert all("-nh" in line for line in readme_dcmtk_lines() if line.startswith(("storescu", "dcmsend")))


@pytest.mark.parametrize("line", readme_dcmtk_lines())
def test_a_readme_dcmtk_line_delivers_pydicoms_test_studies(tmp_path, line):
    require_tool(line.split(" ")[0])
    node = NodeProcess(tmp_path, idle_timeout=2).start()  # AE title FHIRSCP, as the README's lines call it
    try:
        result = subprocess.run(as_run_here(line, node.port, DICOMDIR_TESTS), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        if line.startswith("echoscu"):
            return
        node.wait_for_deliveries_total(INSTANCES, STUDIES)
    finally:
        node.stop()
    delivered = {d["study"]: d["instances"] for d in node.deliveries()}
    assert (len(delivered), sum(delivered.values())) == (STUDIES, INSTANCES)
