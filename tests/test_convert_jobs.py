"""`convert --jobs N`: headers read in worker processes, the same output, lines and exit status as one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from scp.sources.folder import convert_files, list_files
from tests.clocks import wait_for
from tests.conftest import REPO
from tests.dicomgen import generate_study

pytestmark = pytest.mark.usefixtures("strict_pydicom")

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent  # every pydicom test file: good, broken, odd


def run_convert(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "scp", "convert", *map(str, args)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def without_times(stderr: str, out: Path) -> list[str]:
    """The log lines without their time stamp, with the output folder and job count neutral."""
    lines = [line.split(" ", 1)[1] for line in stderr.splitlines()]
    return [line.replace(str(out), "OUT").replace(" 3 job(s)", " N job(s)").replace(" 1 job(s)", " N job(s)")
            for line in lines]


@pytest.fixture(scope="module")
def multi_study_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("studies")
    for n, (instances, series) in enumerate([(40, 3), (25, 2), (1, 1), (60, 4)]):
        generate_study(folder / f"site{n % 2}" / f"s{n}", instances, series)
    (folder / "notes.txt").write_text("not DICOM\n")
    return folder


@pytest.mark.parametrize("source", ["pydicom_test_files", "multi_study_folder"])
def test_output_log_lines_and_exit_status_are_those_of_one_process(source, multi_study_folder, tmp_path):
    folder = TEST_FILES if source == "pydicom_test_files" else multi_study_folder
    one, many = tmp_path / "one", tmp_path / "many"
    single = run_convert(folder, "-o", one, "--jobs", "1")
    parallel = run_convert(folder, "-o", many, "--jobs", "3")
    assert single.returncode == parallel.returncode == 0, parallel.stderr
    assert tree(one) and tree(many) == tree(one)
    assert without_times(parallel.stderr, many) == without_times(single.stderr, one)
    assert "Traceback" not in parallel.stderr


def test_jobs_gives_the_same_report_as_one_process_in_the_library(multi_study_folder):
    files = list_files(multi_study_folder)
    seen: list[Path] = []
    one = convert_files(files, jobs=1)
    many = convert_files(files, jobs=2, progress=seen.append)
    assert seen == files  # the progress callback sees every file once, in order
    assert (many.files_seen, many.skipped, many.rejected) == (one.files_seen, one.skipped, one.rejected)
    assert list(many.studies) == list(one.studies)
    assert [r.imaging_study for r in many.studies.values()] == [r.imaging_study for r in one.studies.values()]


@pytest.mark.parametrize("jobs", ["0", "-2"])
def test_zero_or_negative_jobs_is_a_user_error(jobs, tmp_path):
    generate_study(tmp_path / "in", 1, 1)
    result = run_convert(tmp_path / "in", "-o", tmp_path / "out", "--jobs", jobs)
    assert result.returncode == 2
    assert "convert.jobs: expected a positive number of processes" in result.stderr and jobs in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_jobs_from_the_config_file_and_the_environment(tmp_path):
    from scp.config import load_config

    config = tmp_path / "node.toml"
    config.write_text("[convert]\njobs = 3\n")
    assert load_config(config, {}).convert.jobs == 3
    assert load_config(config, {"DICOM_FHIR_SCP_CONVERT_JOBS": "2"}).convert.jobs == 2
    assert load_config(None, {}).convert.jobs is None  # one per CPU


def children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:  # the process ended
        return []


def long_folder(folder: Path, copies: int = 60) -> Path:
    """About 12,000 files (hard links to 200 generated ones): a conversion long enough to interrupt
    while its workers read, now that 2000 headers take well under a second."""
    study = generate_study(folder / "original", 200, 2)
    for copy in range(copies):
        target = folder / f"copy{copy:02d}"
        target.mkdir()
        for path in study.files:
            os.link(path, target / path.name)
    return folder


def test_ctrl_c_stops_every_process_without_a_traceback(tmp_path):
    long_folder(tmp_path / "in")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Its own process group, as a terminal's foreground job: Ctrl-C is SIGINT to the whole group.
    process = subprocess.Popen([sys.executable, "-m", "scp", "convert", str(tmp_path / "in"), "-o",
                                str(tmp_path / "out"), "--jobs", "2", "-d"], cwd=REPO, env=env,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Interrupt while the workers run (they are the command's children), not before the pool exists.
    wait_for(lambda: children(process.pid) or process.poll() is not None, 60, "the worker processes")
    assert process.poll() is None, "the conversion ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    with pytest.raises(ProcessLookupError):  # no worker is left in the group
        os.killpg(process.pid, 0)


def test_a_killed_worker_ends_the_command_with_one_line_not_a_hang(tmp_path):
    long_folder(tmp_path / "in")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "scp", "convert", str(tmp_path / "in"), "-o",
                                str(tmp_path / "out"), "--jobs", "2"], cwd=REPO, env=env,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers = wait_for(lambda: children(process.pid) or process.poll() is not None, 60, "the worker processes")
    assert process.poll() is None, "the conversion ended before a worker could be killed"
    os.kill(int(workers[0]), signal.SIGKILL)  # as the OOM killer would
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 2, stderr
    errors = [line for line in stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "worker process reading headers ended abruptly" in errors[0], stderr
    assert "Traceback" not in stderr
    assert not list((tmp_path / "out").glob("*.json"))  # nothing half-converted was written
