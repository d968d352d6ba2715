"""`dicom-fhir-scp convert DIR`: the command run as a user runs it (a subprocess)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy
from pydicom.data import get_testdata_file

from tests.conftest import REPO
from tests.dicomgen import generate_study

pytestmark = pytest.mark.usefixtures("strict_pydicom")

DICOMDIR_TESTS = Path(get_testdata_file("DICOMDIR")).parent
CT_STUDY = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.1"  # 2 series: 5 + 2 instances
MR_STUDY = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.1"  # 3 series: 7 + 3 + 1 instances
STUDIES_IN_DICOMDIR_TESTS = 7


def run_convert(*args: str | Path, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "scp", "convert", *map(str, args)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120)


def imaging_study(path: Path) -> ImagingStudy:
    bundle = Bundle.model_validate(json.loads(path.read_text()))
    [study] = [e.resource for e in bundle.entry if e.resource.get_resource_type() == "ImagingStudy"]
    return study


@pytest.fixture(scope="module")
def dicomdirtests_output(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("fhir")
    return run_convert(DICOMDIR_TESTS, "-o", out), out


def test_writes_one_file_per_study_named_by_its_uid(dicomdirtests_output):
    result, out = dicomdirtests_output
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == STUDIES_IN_DICOMDIR_TESTS
    assert f"{CT_STUDY}.json" in names and f"{MR_STUDY}.json" in names


def test_each_imaging_study_holds_the_series_and_instances_of_its_files(dicomdirtests_output):
    _, out = dicomdirtests_output
    ct = imaging_study(out / f"{CT_STUDY}.json")
    assert (ct.numberOfSeries, ct.numberOfInstances) == (2, 7)
    assert sorted(s.numberOfInstances for s in ct.series) == [2, 5]
    mr = imaging_study(out / f"{MR_STUDY}.json")
    assert (mr.numberOfSeries, mr.numberOfInstances) == (3, 11)
    assert sorted(len(s.instance) for s in mr.series) == [1, 3, 7]


def test_every_output_file_validates_as_an_r4_bundle(dicomdirtests_output):
    _, out = dicomdirtests_output
    for path in out.iterdir():
        study = imaging_study(path)  # raises on an invalid resource
        assert study.numberOfInstances == sum(len(s.instance) for s in study.series)


def test_dicomdir_files_are_not_instances_and_are_skipped_without_a_warning(dicomdirtests_output):
    result, _ = dicomdirtests_output
    assert "DICOMDIR" not in "".join(line for line in result.stderr.splitlines() if "WARNING" in line)
    assert "8 DICOMDIR" in result.stderr  # but counted in the summary


def test_non_dicom_files_get_one_warning_line_each(dicomdirtests_output):
    result, _ = dicomdirtests_output
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, result.stderr  # README.txt and TINY_ALPHA/README
    assert all("README" in line and "not a DICOM file" in line for line in warnings)


def test_summary_counts_files_read_skipped_and_studies_written(dicomdirtests_output):
    result, _ = dicomdirtests_output
    assert "read 81 instance(s) from 91 file(s); 7 study(ies) converted" in result.stderr
    assert "skipped 10 file(s): 8 DICOMDIR (an index, not an instance), 2 not a DICOM file" in result.stderr
    assert "wrote 7 study file(s)" in result.stderr


def test_no_progress_bar_when_stderr_is_not_a_terminal(dicomdirtests_output):
    result, _ = dicomdirtests_output
    assert "\r" not in result.stderr and "file/s" not in result.stderr


def test_progress_bar_on_a_terminal(tmp_path):
    generate_study(tmp_path / "in", 3, 1)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # as a real terminal has
    try:
        result = run_convert(tmp_path / "in", "-o", tmp_path / "out", stderr=terminal)
        os.close(terminal)
        terminal = None
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the writer side is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)
    assert result.returncode == 0
    assert b"3/3" in shown


def test_truncated_and_non_dicom_files_are_skipped_and_the_rest_converted(tmp_path):
    study = generate_study(tmp_path / "in", 3, 1)
    cut = tmp_path / "in" / "cut.dcm"
    cut.write_bytes(study.files[0].read_bytes()[:20000])  # an interrupted copy
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "in" / "mr_truncated.dcm")
    (tmp_path / "in" / "notes.txt").write_text("not an image\n")
    result = run_convert(tmp_path / "in", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 3
    assert any("cut.dcm" in w and "truncated" in w for w in warnings)
    assert any("mr_truncated.dcm" in w and "truncated" in w for w in warnings)
    assert any("notes.txt" in w and "not a DICOM file" in w for w in warnings)
    assert imaging_study(tmp_path / "out" / f"{study.study_uid}.json").numberOfInstances == 3


def test_two_studies_in_one_folder_give_two_files(tmp_path):
    first = generate_study(tmp_path / "in" / "a", 2, 1)
    second = generate_study(tmp_path / "in" / "b" / "deeper", 3, 2)
    result = run_convert(tmp_path / "in", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{first.study_uid}.json", f"{second.study_uid}.json"])
    assert imaging_study(tmp_path / "out" / f"{second.study_uid}.json").numberOfSeries == 2


def test_exit_status_1_when_nothing_converts(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no DICOM here\n")
    result = run_convert(tmp_path / "in", "-o", tmp_path / "out")
    assert result.returncode == 1
    assert not list((tmp_path / "out").glob("*.json"))


def test_exit_status_2_for_a_folder_that_does_not_exist(tmp_path):
    """A user error (issue #13): one line naming the folder, exit status 2, no traceback."""
    result = run_convert(tmp_path / "missing", "-o", tmp_path / "out")
    assert result.returncode == 2
    assert "missing" in result.stderr and "no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_rerunning_merges_without_duplicates(tmp_path):
    study = generate_study(tmp_path / "in", 4, 2)
    assert run_convert(tmp_path / "in", "-o", tmp_path / "out").returncode == 0
    first = (tmp_path / "out" / f"{study.study_uid}.json").read_text()
    result = run_convert(tmp_path / "in", "-o", tmp_path / "out")
    assert result.returncode == 0
    assert "1 already up to date" in result.stderr
    assert (tmp_path / "out" / f"{study.study_uid}.json").read_text() == first
    assert imaging_study(tmp_path / "out" / f"{study.study_uid}.json").numberOfInstances == 4


def test_study_whose_instances_disagree_on_patient_id_is_not_written(tmp_path):
    study = generate_study(tmp_path / "in" / "a", 2, 1, patient_id="PID-ALPHA-1")
    generate_study(tmp_path / "in" / "b", 1, 1, study_uid=study.study_uid, patient_id="PID-BRAVO-2")
    other = generate_study(tmp_path / "in" / "c", 1, 1)
    result = run_convert(tmp_path / "in", "-o", tmp_path / "out")
    assert result.returncode == 0  # the other study was written
    assert not (tmp_path / "out" / f"{study.study_uid}.json").exists()
    assert (tmp_path / "out" / f"{other.study_uid}.json").exists()
    assert "1 study(ies) NOT written: 1 instances disagree on PatientID" in result.stderr
    assert "PID-ALPHA-1" not in result.stderr and "PID-BRAVO-2" not in result.stderr


def test_config_mapping_section_applies_and_flags_override_it(tmp_path):
    study = generate_study(tmp_path / "in", 1, 1)
    config = tmp_path / "node.toml"
    config.write_text('[mapping]\ndicomweb_url = "https://pacs.example.org/dicom-web"\n')
    result = run_convert(tmp_path / "in", "-o", tmp_path / "out", "--config", config, "--shape", "contained",
                         "--dicomweb-url", "https://other.example.org/wado")
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "out" / f"{study.study_uid}.json").read_text())
    study_resource = ImagingStudy.model_validate(doc)
    endpoints = [r for r in study_resource.contained if r.get_resource_type() == "Endpoint"]
    assert [e.address for e in endpoints] == ["https://other.example.org/wado"]


def test_invalid_mapping_option_is_a_configuration_error(tmp_path):
    generate_study(tmp_path / "in", 1, 1)
    result = run_convert(tmp_path / "in", "-o", tmp_path / "out", "--timezone", "Mars/Olympus")
    assert result.returncode == 2
    assert "timezone" in result.stderr
