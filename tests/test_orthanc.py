"""Orthanc (a real PACS, Debian's package) pushes a multi-series study to the node.

Orthanc cannot bind a single address, so the test runs it and the node together in a
private network namespace (tests/orthanc_push.py under `unshare -n`). Needs root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import IN_CI, require_tool
from tests.dicomgen import generate_study

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

HERE = Path(__file__).resolve().parent


def _imaging_study(document: dict) -> dict:
    if document["resourceType"] == "ImagingStudy":
        return document
    return next(e["resource"] for e in document["entry"] if e["resource"]["resourceType"] == "ImagingStudy")


def test_orthanc_pushes_a_multi_series_study_and_every_instance_arrives(tmp_path):
    require_tool("Orthanc")
    require_tool("unshare")
    if os.geteuid() != 0:
        message = "a private network namespace for Orthanc needs root"
        pytest.fail(message) if IN_CI else pytest.skip(message)

    ct = generate_study(tmp_path / "ct", n_instances=30, n_series=3)
    # A second, real MR study: another SOP class, so Orthanc opens more than one association.
    # The folder holds three studies of one patient; take the one with 3 series / 11 instances.
    anchor = Path(get_testdata_file("dicomdirtests/98892003/MR700/4648"))
    mr_uid = pydicom.dcmread(anchor, stop_before_pixels=True).StudyInstanceUID
    mr_files = sorted(p for p in anchor.parent.parent.rglob("*") if p.is_file()
                      and pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == mr_uid)
    files = list(ct.files) + mr_files
    assert len(mr_files) > 0

    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.orthanc_push", str(tmp_path), *map(str, files)],
        capture_output=True, text=True, timeout=180, cwd=HERE.parent)
    if result.returncode != 0:
        logs = "\n".join(f"--- {name}\n{(tmp_path / name).read_text(errors='replace')[-3000:]}"
                         for name in ("node.log", "orthanc.log") if (tmp_path / name).exists())
        pytest.fail(f"Orthanc push failed:\n{result.stderr[-3000:]}\n{logs}")
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["push"]["FailedInstancesCount"] == 0
    assert len(report["study_uids"]) == 2
    study = _imaging_study(report["outputs"][ct.study_uid])
    assert study["numberOfSeries"] == 3
    assert study["numberOfInstances"] == 30
    received = {i["uid"] for s in study["series"] for i in s["instance"]}
    assert received == set(ct.sop_uids)
    mr_uid = next(uid for uid in report["study_uids"] if uid != ct.study_uid)
    assert _imaging_study(report["outputs"][mr_uid])["numberOfInstances"] == len(mr_files)
