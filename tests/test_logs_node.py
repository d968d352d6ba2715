"""The node's log as a log collector reads it: `serve --log-format json` in a subprocess, fed a
study over DICOM; every line is one JSON object, and the association, C-STORE and delivery
lines carry the fields they know. The text format shows the zone."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import pydicom
import pytest

from tests.dicomgen import generate_study
from tests.scp_node import NodeProcess, node  # noqa: F401 (fixture)
from tests.scu import associate

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

ZONED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d")


def send(scp: NodeProcess, files, calling: str = "LOGSCU") -> list[int]:
    assoc = associate(scp.port, calling=calling, called=scp.ae_title)
    assert assoc.is_established, "association refused"
    try:
        return [assoc.send_c_store(path).Status for path in files]
    finally:
        assoc.release()


def json_log(scp: NodeProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in scp.log().splitlines()]  # raises on any line that is not JSON


def test_every_line_of_a_json_log_is_an_object_with_time_level_logger_and_message(tmp_path, node):
    study = generate_study(tmp_path / "study", n_instances=3, n_series=1)
    scp = node("--log-format", "json", "-d")  # -d: pynetdicom's own lines too
    assert send(scp, study.files) == [0, 0, 0]
    scp.wait_for_deliveries(study.study_uid)
    scp.stop()

    lines = json_log(scp)
    assert len(lines) > 10
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
        assert ZONED.fullmatch(line["time"]) and datetime.fromisoformat(line["time"]).utcoffset() is not None
    assert any(line["logger"].startswith("pynetdicom") for line in lines)


def test_association_c_store_and_delivery_lines_carry_their_fields(tmp_path, node):
    study = generate_study(tmp_path / "study", n_instances=2, n_series=1)
    scp = node("--log-format", "json", "-d")
    send(scp, study.files)
    scp.wait_for_deliveries(study.study_uid)
    scp.stop()

    lines = [line for line in json_log(scp) if line["logger"].startswith("scp.")]
    stored = [line for line in lines if "stored" in line["message"] and line["message"].startswith("C-STORE")]
    assert {line["instance_uid"] for line in stored} == set(study.sop_uids)
    assert all(line["calling_aet"] == "LOGSCU" and line["study_uid"] == study.study_uid
               and line["status"] == "0x0000" and line["peer"].startswith("127.0.0.1:") for line in stored)
    [closed] = [line for line in lines if line["message"].startswith("association from LOGSCU")
                and "released" in line["message"]]
    assert closed["calling_aet"] == "LOGSCU" and closed["level"] == "INFO"
    [delivered] = [line for line in lines if line["message"].startswith(f"study {study.study_uid} delivered")]
    assert delivered["study_uid"] == study.study_uid and delivered["destination"] == "disk"


def test_a_refused_instance_is_logged_with_its_status(tmp_path, node):
    study = generate_study(tmp_path / "study", n_instances=1, n_series=1)
    scp = node("--log-format", "json")
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(study.files[0])
    del ds.StudyInstanceUID
    ds.save_as(broken)
    [status] = send(scp, [broken])
    assert status != 0
    scp.stop()

    [refused] = [line for line in json_log(scp) if "refused with" in line["message"]]
    assert refused["level"] == "WARNING" and refused["calling_aet"] == "LOGSCU"
    assert refused["instance_uid"] == study.sop_uids[0] and refused["status"] == f"0x{status:04X}"


def test_logging_format_json_in_the_config_file_applies(tmp_path, node):
    scp = node(config='[logging]\nformat = "json"\n')
    scp.stop()
    assert any(line["message"].startswith("node FHIRSCP ready") for line in json_log(scp))


def test_a_text_log_shows_the_time_with_its_zone(tmp_path, node):
    scp = node()
    scp.stop()
    for line in scp.log().splitlines():
        assert ZONED.fullmatch(line.split()[0]), line
