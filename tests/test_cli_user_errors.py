"""A user error is ONE clear line and exit status 2, never a traceback (issue #13).

Unwritable folders are made with a regular file where the folder should be, or a path
under a file: the tests may run as root, where permission bits stop nothing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.conftest import REPO
from tests.dicomgen import generate_study

pytestmark = pytest.mark.interop  # starts `serve` in a subprocess


def run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_FHIR_SCP_")}
    environ.update(env or {})
    environ["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "scp", *map(str, args)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], result.stderr


def serve(tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """serve with every folder under tmp_path unless given; it must exit at once (an error)."""
    folders = {"--spool-dir": tmp_path / "spool", "--dead-letter-dir": tmp_path / "dead",
               "-od": tmp_path / "out"}
    given = [str(a) for a in args]
    defaults = [str(x) for flag, path in folders.items() if flag not in given for x in (flag, path)]
    return run("serve", "--bind", "127.0.0.1", *defaults, *args, env=env)


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain-file"
    path.write_text("not a folder\n")
    return path


# --- convert ------------------------------------------------------------------------------


def test_convert_into_a_file_is_one_line_and_status_2(tmp_path):
    generate_study(tmp_path / "in", 1, 1)
    assert_one_line_error(run("convert", tmp_path / "in", "-od", a_file(tmp_path)), "plain-file", "not a folder")


def test_convert_into_a_folder_under_a_file_is_one_line_and_status_2(tmp_path):
    generate_study(tmp_path / "in", 1, 1)
    assert_one_line_error(run("convert", tmp_path / "in", "-od", a_file(tmp_path) / "out"), "lies under the file")


def test_convert_takes_the_output_folder_as_od_or_as_a_second_argument(tmp_path):
    study = generate_study(tmp_path / "in", 1, 1)
    assert run("convert", tmp_path / "in", "-od", tmp_path / "a").returncode == 0
    assert run("convert", tmp_path / "in", tmp_path / "b").returncode == 0
    assert (tmp_path / "a" / f"{study.study_uid}.json").exists() and (tmp_path / "b" / f"{study.study_uid}.json").exists()


def test_convert_with_two_different_output_folders_is_an_error(tmp_path):
    generate_study(tmp_path / "in", 1, 1)
    assert_one_line_error(run("convert", tmp_path / "in", tmp_path / "a", "-od", tmp_path / "b"), "two different")


def test_quiet_convert_prints_warnings_but_no_information(tmp_path):
    generate_study(tmp_path / "in", 1, 1)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM\n")
    result = run("convert", "-q", tmp_path / "in", "-od", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "INFO" not in result.stderr
    assert "notes.txt" in result.stderr and "WARNING" in result.stderr


def test_a_pydicom_warning_names_the_file_being_read(tmp_path):
    import pydicom
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    (tmp_path / "in").mkdir()
    with pytest.warns(UserWarning):
        source.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2_x"  # not a valid UID
        source.save_as(tmp_path / "in" / "odd.dcm")
    result = run("convert", tmp_path / "in", "-od", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "Invalid value for VR UI" in line]
    assert "WARNING" in line and str(tmp_path / "in" / "odd.dcm") in line
    assert "1.2.840.10008.5.1.4.1.1.2_x" not in result.stderr  # values only with -d
    assert "valuerep.py" not in result.stderr  # not printed bare by the warnings module


# --- serve --------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--spool-dir", "--dead-letter-dir", "-od", "--archive-dir"])
def test_serve_with_a_file_where_a_folder_should_be_is_one_line_and_status_2(tmp_path, flag):
    assert_one_line_error(serve(tmp_path, "0", flag, a_file(tmp_path)), "plain-file", "not a folder", flag)


@pytest.mark.parametrize("flag", ["--spool-dir", "--dead-letter-dir", "-od"])
def test_serve_with_a_folder_under_a_file_is_one_line_and_status_2(tmp_path, flag):
    assert_one_line_error(serve(tmp_path, "0", flag, a_file(tmp_path) / "x"), "lies under the file", flag)


def test_serve_on_a_port_in_use_is_one_line_and_status_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(serve(tmp_path, str(port)), "cannot listen", str(port))


def test_serve_with_the_operations_port_in_use_is_one_line_and_status_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, "0", env={"DICOM_FHIR_SCP_OPERATIONS_HTTP_ENABLED": "true",
                                           "DICOM_FHIR_SCP_OPERATIONS_HTTP_PORT": str(port)})
        assert_one_line_error(result, "operations.http_port", str(port))


def test_serve_with_two_different_ports_is_an_error(tmp_path):
    assert_one_line_error(serve(tmp_path, "11112", "--port", "104"), "PORT 11112", "--port 104")


def test_serve_with_a_broken_config_file_is_one_line_and_status_2(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[node\nport = 1\n")
    assert_one_line_error(serve(tmp_path, "0", "--config", config), str(config))


def test_serve_with_a_config_file_that_does_not_exist_is_one_line_and_status_2(tmp_path):
    assert_one_line_error(serve(tmp_path, "0", env={"DICOM_FHIR_SCP_CONFIG": str(tmp_path / "none.toml")}),
                          "none.toml", "not found")


def test_serve_with_a_mistyped_environment_variable_names_it(tmp_path):
    assert_one_line_error(serve(tmp_path, "0", env={"DICOM_FHIR_SCP_NODE_PROT": "104"}), "DICOM_FHIR_SCP_NODE_PROT")


def test_serve_with_a_bad_environment_value_names_the_variable(tmp_path):
    assert_one_line_error(serve(tmp_path, env={"DICOM_FHIR_SCP_NODE_IDLE_TIMEOUT": "-1"}),
                          "DICOM_FHIR_SCP_NODE_IDLE_TIMEOUT")


# --- retry --------------------------------------------------------------------------------


def test_retry_into_an_output_folder_under_a_file_is_one_line_and_status_2(tmp_path):
    (tmp_path / "dead").mkdir()
    result = run("retry", "--all", "--dead-letter-dir", tmp_path / "dead", "--spool-dir", a_file(tmp_path) / "s")
    assert_one_line_error(result, "lies under the file")
