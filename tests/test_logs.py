"""Log lines (scp.logs): the JSON and text formats, how the format is chosen, and what never
reaches INFO or above (patient IDs in a FHIR server's diagnostics)."""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import datetime
from typing import Any, Iterator

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from mapping.errors import ConfigurationError
from scp.cli import build_parser, log_format
from scp.config import LOG_FORMATS, FhirConfig, config_from_mapping
from scp.logs import FORMATS, JsonFormatter, TextFormatter, dimse_status, timestamp
from scp.sinks.fhir.client import FhirClient
from scp.sinks.fhir.sink import FhirSink
from scp.store.spool import MemorySpool
from tests.spooled import make_worker, spool_instance
from tests.clocks import FakeClock

ZONED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d")


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A logger of its own, writing to a string (the root logger and pytest's capture untouched)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("tests.logs")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    yield log, stream, handler
    log.removeHandler(handler)
    log.propagate = True


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_has_time_with_zone_level_logger_and_the_message(logger):
    log, stream, handler = logger
    handler.setFormatter(JsonFormatter())
    log.warning("study %s: %d instance(s)", "1.2.3", 4)
    [line] = json_lines(stream)
    assert line["level"] == "WARNING" and line["logger"] == "tests.logs"
    assert line["message"] == "study 1.2.3: 4 instance(s)"
    assert ZONED.fullmatch(line["time"]) and datetime.fromisoformat(line["time"]).utcoffset() is not None


def test_the_known_extra_fields_go_into_the_json_line_and_others_do_not(logger):
    log, stream, handler = logger
    handler.setFormatter(JsonFormatter())
    log.info("stored", extra={"calling_aet": "MOD1", "study_uid": "1.2", "instance_uid": "1.2.3",
                              "status": dimse_status(0xA700), "destination": "fhir", "internal": "x"})
    [line] = json_lines(stream)
    assert {k: line[k] for k in ("calling_aet", "study_uid", "instance_uid", "status", "destination")} == {
        "calling_aet": "MOD1", "study_uid": "1.2", "instance_uid": "1.2.3", "status": "0xA700",
        "destination": "fhir"}
    assert "internal" not in line and "peer" not in line  # absent fields are left out, not null


def test_an_exception_is_given_as_its_type_and_its_traceback_text(logger):
    log, stream, handler = logger
    handler.setFormatter(JsonFormatter())
    try:
        raise OSError("disk full")
    except OSError:
        log.exception("not stored")
    [line] = json_lines(stream)
    assert line["message"] == "not stored" and line["exc_type"] == "OSError"
    assert "Traceback" in line["exc"] and "OSError: disk full" in line["exc"]


def test_non_ascii_text_stays_one_ascii_json_line_that_reads_back_the_same(logger):
    log, stream, handler = logger
    handler.setFormatter(JsonFormatter())
    log.info("Schädel\nCT 頭部", extra={"calling_aet": "MÜNSTER"})
    text = stream.getvalue()
    assert text.isascii() and text.count("\n") == 1
    [line] = json_lines(stream)
    assert line["message"] == "Schädel\nCT 頭部" and line["calling_aet"] == "MÜNSTER"


def test_a_text_line_shows_the_time_with_its_zone(logger):
    log, stream, handler = logger
    handler.setFormatter(TextFormatter())
    log.info("listening", extra={"calling_aet": "MOD1"})
    time, level, name, message = stream.getvalue().rstrip("\n").split(maxsplit=3)
    assert ZONED.fullmatch(time) and (level, name, message) == ("INFO", "tests.logs:", "listening")


def test_timestamps_are_milliseconds_in_the_local_zone_with_its_offset():
    assert datetime.fromisoformat(timestamp(1_800_000_000.1234)).timestamp() == pytest.approx(1_800_000_000.123)


def test_logging_format_is_validated():
    assert config_from_mapping({"logging": {"format": "json"}}, environ={}).logging.format == "json"
    with pytest.raises(ConfigurationError, match="logging.format"):
        config_from_mapping({"logging": {"format": "xml"}}, environ={})


def test_the_config_and_the_formatters_know_the_same_formats():
    assert LOG_FORMATS == FORMATS


def test_logging_format_from_the_config_file_applies_and_the_flag_overrides_it(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[logging]\nformat = "json"\n')
    parser = build_parser()
    assert log_format(parser.parse_args(["status", "-c", str(config)])) == "json"
    assert log_format(parser.parse_args(["status", "-c", str(config), "--log-format", "text"])) == "text"
    assert log_format(parser.parse_args(["status"])) == "text"


def test_every_command_takes_log_format():
    parser = build_parser()
    for command in ("serve", "convert", "retry", "status"):
        extra = ["in"] if command == "convert" else []
        assert parser.parse_args([command, *extra, "--log-format", "json"]).log_format == "json"


# --- a FHIR server's diagnostics quoting a patient ID ------------------------------------------

PATIENT_ID = "PID-SECRET-4711"
HAPI_OUTCOME = {"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "processing",
     "diagnostics": f"HAPI-0958: Failed to process conditional create. The match URL "
                    f"\"Patient?identifier=urn%3Aoid%3A1.2.3%7C{PATIENT_ID}\" returned 2 matches"},
    {"severity": "warning", "code": "processing", "diagnostics": f"identifier {PATIENT_ID} is ambiguous"}]}


class RefusingServer:
    """A requests.Session stand-in: the search finds nothing, the transaction is refused as HAPI does."""

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        response = requests.Response()
        response.url = url
        response.headers = CaseInsensitiveDict({"Content-Type": "application/fhir+json"})
        if method == "GET":
            response.status_code, body = 200, {"resourceType": "Bundle", "type": "searchset", "entry": []}
        else:
            response.status_code, body = 422, HAPI_OUTCOME
        response._content = json.dumps(body).encode()
        return response


def test_server_diagnostics_with_a_patient_id_stay_in_outcome_json_and_debug(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    spool = MemorySpool()
    sops = {spool_instance(spool, "1.2.3", patient_id=PATIENT_ID) for _ in range(2)}
    fhir = FhirConfig(url="http://fhir.test/R4")
    sink = FhirSink(fhir, client=FhirClient(fhir, session_factory=RefusingServer))
    worker = make_worker(tmp_path, spool, [sink], FakeClock())
    worker.submit("1.2.3", sops)
    worker.run_once()

    folder = tmp_path / "dead" / "1.2.3"
    first, _, details = (folder / "reason.txt").read_text().partition("\n")
    assert first.endswith("HTTP 422 to POST http://fhir.test/R4 (OperationOutcome: 2 issue(s), severity error, "
                          "codes: processing; details in outcome.json)")
    assert PATIENT_ID not in first and PATIENT_ID in details
    assert PATIENT_ID in (folder / "outcome.json").read_text()
    assert PATIENT_ID not in (tmp_path / "deliveries.jsonl").read_text()
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("set aside" in m for m in shown) and not any(PATIENT_ID in m for m in shown)
    assert any(PATIENT_ID in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
