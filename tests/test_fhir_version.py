"""fhir.version: one FHIR release per node, written by the mapping and expected of every
FHIR server (GET metadata). The R5 delivery runs against a small HTTP stand-in that answers
/metadata 5.0.0 and records what it is sent: no R5 FHIR server installs here."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mapping import ConfigurationError, render
from mapping.fhirjson import model_json, validated
from scp.cli import build_parser, main
from scp.commands.serve import load
from scp.config import FhirConfig, config_from_mapping, load_config
from scp.errors import DeliveryRetryable
from scp.sinks.disk import UnusableOutputError, write_study
from scp.sinks.fhir.sink import FhirSink, fhir_release
from tests.mapping_cases import DICOMDIR_TESTS, convert, instance
from tests.scp_node import imaging_study

pytestmark = pytest.mark.interop  # a real HTTP server (the stand-in) on a real socket

WADO = "https://pacs.example.org/dicom-web"


# --- configuration ----------------------------------------------------------------------------

def test_fhir_version_is_r4_by_default():
    config = load_config(None, {})
    assert (config.fhir.version, config.mapping.fhir_version) == ("R4", "R4")


def test_fhir_version_sets_the_mappings_version():
    config = config_from_mapping({"fhir": {"version": "R5"}}, environ={})
    assert (config.fhir.version, config.mapping.fhir_version) == ("R5", "R5")


def test_fhir_version_other_than_r4_or_r5_is_refused():
    with pytest.raises(ConfigurationError, match=r"fhir.version: expected one of \('R4', 'R5'\), got 'R4B'"):
        config_from_mapping({"fhir": {"version": "R4B"}}, environ={})


def test_dicom_fhir_scp_fhir_version_sets_it():
    assert load_config(None, {"DICOM_FHIR_SCP_FHIR_VERSION": "R5"}).mapping.fhir_version == "R5"


def test_a_destination_takes_fhir_version():
    config = config_from_mapping({"fhir": {"version": "R5", "destinations": {"b": {"url": "http://b.example"}}}},
                                 environ={})
    assert config.destinations["b"].version == "R5"


def test_a_destination_of_another_version_is_refused():
    with pytest.raises(ConfigurationError, match="fhir.destinations.b.version = 'R4' differs from "
                                                 "fhir.version = 'R5': one FHIR version per node"):
        config_from_mapping({"fhir": {"version": "R5", "destinations": {"b": {"url": "http://b.example",
                                                                             "version": "R4"}}}}, environ={})


def test_a_mapping_fhir_version_other_than_fhir_version_is_refused():
    with pytest.raises(ConfigurationError, match="mapping.fhir_version = 'R5' differs from fhir.version = 'R4'"):
        config_from_mapping({"mapping": {"fhir_version": "R5"}}, environ={})


def test_fhir_version_flag_on_serve_sets_the_mapping_and_the_destinations(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[fhir.destinations.b]\nurl = "http://b.example"\n')
    config = load(build_parser().parse_args(["serve", "--config", str(path), "--fhir-version", "R5"]))
    assert (config.fhir.version, config.mapping.fhir_version, config.destinations["b"].version) == ("R5",) * 3


def test_fhir_version_flag_on_convert_takes_r4_or_r5_only(capsys):
    assert build_parser().parse_args(["convert", "in", "--fhir-version", "R5"]).fhir_version == "R5"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "in", "--fhir-version", "R6"])


@pytest.mark.parametrize("text, release", [("4.0.1", "R4"), ("4.0.0", "R4"), ("5.0.0", "R5"), ("4.3.0", "4.3.0"),
                                           ("", None), (None, None)])
def test_capability_statement_fhir_version_names_the_release(text, release):
    assert fhir_release(text) == release


def test_convert_with_fhir_version_r5_writes_valid_r5_for_the_dicomdir_tests_folder(tmp_path):
    """The acceptance check: every study file of pydicom's dicomdirtests folder is valid R5 (and
    exactly what the R5 models write); converting again changes nothing."""
    out = tmp_path / "out"
    argv = ["convert", str(DICOMDIR_TESTS), "--fhir-version", "R5", "-o", str(out), "--dicomweb-url", WADO]
    assert main(argv) == 0
    files = sorted(out.glob("*.json"))
    assert len(files) == 7
    for path in files:
        document = json.loads(path.read_text())
        assert model_json(validated(document, str(path), "R5")) == document
        assert all(validated(entry["resource"], str(path), "R5") for entry in document["entry"])
    before = [path.read_bytes() for path in files]
    assert main(argv) == 0
    assert [path.read_bytes() for path in files] == before


def test_the_disk_sink_merges_an_r5_part_into_its_file_and_a_resend_changes_nothing(tmp_path):
    first = convert(instance(1, 1), fhir_version="R5")
    second = convert(instance(2, 1), fhir_version="R5")
    path, _ = write_study(first, tmp_path)
    assert write_study(second, tmp_path) == (path, True)
    document = json.loads(path.read_text())
    assert len(imaging_study(document)["series"]) == 2
    assert model_json(validated(document, "file", "R5")) == document
    assert write_study(second, tmp_path) == (path, False)


def test_the_disk_sink_rewrites_an_r4_file_as_r5_when_it_merges_an_r5_part(tmp_path):
    path, _ = write_study(convert(instance(1, 1)), tmp_path)
    write_study(convert(instance(2, 1), fhir_version="R5"), tmp_path)
    document = json.loads(path.read_text())
    assert document == render(convert(instance(1, 1), instance(2, 1), fhir_version="R5"))


def test_the_disk_sink_never_turns_an_r5_file_into_r4(tmp_path):
    path, _ = write_study(convert(instance(1, 1), fhir_version="R5"), tmp_path)
    before = path.read_bytes()
    with pytest.raises(UnusableOutputError, match="cannot turn FHIR R5 resources into R4"):
        write_study(convert(instance(2, 1)), tmp_path)
    assert path.read_bytes() == before


# --- an R5 server stand-in --------------------------------------------------------------------

class StandIn:
    """An HTTP server on port 0: GET metadata answers ``fhir_version`` (or 503 while ``down``),
    the ImagingStudy search answers what was stored, a transaction stores its ImagingStudy,
    a PUT replaces it; ``sent`` records every request body."""

    def __init__(self, fhir_version: str) -> None:
        self.fhir_version = fhir_version
        self.down = False
        self.sent: list[tuple[str, str, Any]] = []
        self.study: dict[str, Any] | None = None
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's names)
                stand_in.sent.append(("GET", self.path, None))
                if self.path.startswith("/metadata"):
                    if stand_in.down:
                        return self._answer(503, {"resourceType": "OperationOutcome"})
                    return self._answer(200, {"resourceType": "CapabilityStatement", "status": "active",
                                              "kind": "instance", "fhirVersion": stand_in.fhir_version})
                entries = [{"resource": stand_in.study, "search": {"mode": "match"}}] if stand_in.study else []
                return self._answer(200, {"resourceType": "Bundle", "type": "searchset", "entry": entries})

            def _body(self) -> Any:
                return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

            def do_POST(self) -> None:  # noqa: N802
                bundle = self._body()
                stand_in.sent.append(("POST", self.path, bundle))
                answers = []
                for entry in bundle["entry"]:
                    kind = entry["resource"]["resourceType"]
                    if kind == "ImagingStudy":  # stored with the Bundle's urn:uuid references resolved
                        study = json.loads(json.dumps(entry["resource"]).replace('"urn:uuid:', '"Resource/'))
                        stand_in.study = {**study, "id": "s1", "meta": {"versionId": "1"}}
                    answers.append({"response": {"status": "201 Created", "location": f"{kind}/x1/_history/1"}})
                answers[-1]["response"]["location"] = "ImagingStudy/s1/_history/1"
                self._answer(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers})

            def do_PUT(self) -> None:  # noqa: N802
                body = self._body()
                stand_in.sent.append(("PUT", self.path, body))
                stand_in.study = {**body, "meta": {"versionId": "2"}}
                self._answer(200, stand_in.study)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def bodies(self, method: str) -> list[Any]:
        return [body for m, _, body in self.sent if m == method]


@pytest.fixture
def r5_server() -> Iterator[StandIn]:
    server = StandIn("5.0.0")
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def sink_for(server: StandIn, version: str) -> FhirSink:
    return FhirSink(FhirConfig(url=server.url, version=version, timeout=10))


def test_a_server_of_the_configured_version_is_accepted(r5_server):
    assert sink_for(r5_server, "R5").check_server_version() == "R5"


def test_a_server_of_another_version_is_refused_naming_both():
    server = StandIn("4.0.1")
    server.thread.start()
    try:
        with pytest.raises(ConfigurationError, match=r"speaks FHIR R4 .* but fhir.version is R5"):
            sink_for(server, "R5").check_server_version()
    finally:
        server.server.shutdown()
        server.server.server_close()


def test_a_server_that_cannot_be_read_at_start_is_checked_before_the_first_delivery(r5_server):
    r5_server.down = True
    sink = sink_for(r5_server, "R4")
    assert sink.check_server_version() is None  # not fatal: the node keeps serving
    r5_server.down = False
    with pytest.raises(DeliveryRetryable, match="speaks FHIR R5 .* but fhir.version is R4"):
        sink.deliver(convert(instance()))
    assert not r5_server.bodies("POST")  # nothing sent to a server of another version


def test_an_r5_study_is_delivered_as_valid_r5_and_a_second_part_merged_into_it(r5_server):
    sink = sink_for(r5_server, "R5")
    sink.check_server_version()
    sink.deliver(convert(instance(1, 1, AccessionNumber="A1"), dicomweb_url=WADO, fhir_version="R5"))
    [bundle] = r5_server.bodies("POST")
    validated(bundle, "sent", "R5")
    assert all(validated(e["resource"], "sent", "R5") for e in bundle["entry"])
    sink.deliver(convert(instance(2, 1, AccessionNumber="A1"), dicomweb_url=WADO, fhir_version="R5"))
    [put] = r5_server.bodies("PUT")
    study = validated({k: v for k, v in put.items() if k != "meta"}, "sent", "R5")
    assert [s.uid for s in study.series] == [f"{instance().StudyInstanceUID}.1", f"{instance().StudyInstanceUID}.2"]
    assert study.basedOn[0].identifier.value == "A1"
    sink.deliver(convert(instance(2, 1, AccessionNumber="A1"), dicomweb_url=WADO, fhir_version="R5"))
    assert len(r5_server.bodies("PUT")) == 1  # a resend changes nothing: nothing sent
