"""/readyz and /metrics of a real node (scp.node.Node in this process, its operations endpoint
over HTTP on port 0), fed by a pynetdicom sender and delivering to the real FHIR engine."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from scp.config import Config, FhirConfig, NodeConfig, OperationsConfig
from scp.node import Node
from scp.ops.http import start_ops_server
from scp.ops.metrics import Metrics
from tests.clocks import wait_for
from tests.dicomgen import GeneratedStudy, generate_study
from tests.fhir_engine import fhir_engine, fhir_engine_process, start_or_skip  # noqa: F401
from tests.scu import keep_responses

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

SENDER = "MODALITY"


def config(tmp_path: Path, *, fhir_url: str | None = None, idle_timeout: float = 0.3,
           min_free_bytes: int = 0) -> Config:
    return Config(
        node=NodeConfig(port=0, bind="127.0.0.1", spool_dir=tmp_path / "spool", output_dir=tmp_path / "out",
                        dead_letter_dir=tmp_path / "dead-letter", idle_timeout=idle_timeout),
        fhir=FhirConfig(url=fhir_url, timeout=5, max_backoff=0.5),
        operations=OperationsConfig(http_enabled=True, http_port=0, min_free_bytes=min_free_bytes))


class Running:
    """A started node and its operations endpoint."""

    def __init__(self, cfg: Config) -> None:
        self.metrics = Metrics()
        self.node = Node(cfg, metrics=self.metrics)
        self.node.start()
        self.ops = start_ops_server(cfg.operations, self.metrics, self.node.readiness)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def readyz(self) -> tuple[int, dict]:
        status, body = self.get("/readyz")
        return status, json.loads(body)

    def samples(self) -> dict[tuple[str, tuple], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> None:
        self.ops.stop()
        self.node.stop(grace=2)


@pytest.fixture
def running():
    started: list[Running] = []

    def start(cfg: Config) -> Running:
        started.append(Running(cfg))
        return started[-1]

    yield start
    for r in started:
        r.stop()


def send(port: int, study: GeneratedStudy, ae_title: str = SENDER) -> None:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="FHIRSCP"))
    assert assoc.is_established
    try:
        for path in study.files:
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()


def test_a_started_node_is_ready_and_a_stopped_one_is_not_listening(tmp_path, running):
    r = running(config(tmp_path))
    status, body = r.readyz()
    assert status == 200, body
    assert body["ready"] is True and set(body["checks"]) == {"listening", "spool"}  # no FHIR sink configured
    r.node.server.stop()
    status, body = r.readyz()
    assert status == 503 and body["failed"] == ["listening"]


def test_readyz_fails_on_the_spool_while_its_folder_is_a_file_and_passes_again_when_fixed(tmp_path, running):
    r = running(config(tmp_path))
    spool = tmp_path / "spool"
    spool.rename(tmp_path / "spool.moved")
    spool.write_text("an operator's mistake")  # root ignores chmod; a file in the way stops everyone
    status, body = r.readyz()
    assert status == 503 and body["failed"] == ["spool"]
    assert "not writable" in body["checks"]["spool"]["detail"]
    spool.unlink()
    (tmp_path / "spool.moved").rename(spool)
    assert r.readyz()[0] == 200


def test_readyz_fails_on_the_spool_below_operations_min_free_bytes(tmp_path, running):
    r = running(config(tmp_path, min_free_bytes=2**62))
    status, body = r.readyz()
    assert status == 503 and body["failed"] == ["spool"]
    assert "operations.min_free_bytes" in body["checks"]["spool"]["detail"]


def test_readyz_fails_on_fhir_while_the_engine_is_down_and_passes_once_it_is_up(
        tmp_path, running, refusing_port):
    port = refusing_port.port
    r = running(config(tmp_path, fhir_url=f"http://127.0.0.1:{port}"))
    status, body = r.readyz()
    assert status == 503 and body["failed"] == ["fhir"]
    detail = body["checks"]["fhir"]["detail"]
    assert f"GET http://127.0.0.1:{port}/metadata: FHIR server" in detail and "unreachable" in detail
    assert "ready_window" in detail
    assert body["checks"]["listening"] == {"ok": True} and body["checks"]["spool"] == {"ok": True}
    refusing_port.release()
    with start_or_skip(port=port):
        # The failed probe is remembered a few seconds (scrapes must not hammer the server).
        status, body = wait_for(lambda: (answer := r.readyz())[0] == 200 and answer, 30, "/readyz to pass")
        assert body["checks"]["fhir"]["ok"] is True


def test_a_recent_delivery_keeps_fhir_ready_while_metadata_fails(tmp_path, running, fhir_engine):
    r = running(config(tmp_path, fhir_url=fhir_engine.base_url))
    fhir_engine.fault(count=1000, mode="close", path="metadata")
    assert r.readyz()[0] == 503  # no delivery yet, and /metadata drops the connection
    send(r.node.port, generate_study(tmp_path / "in", 2, 1))
    wait_for(lambda: r.metrics.snapshot()["deliveries_ok"] == 1, 30, "the delivery")
    status, body = r.readyz()
    assert status == 200, body
    assert "last delivery" in body["checks"]["fhir"]["detail"]


def test_metrics_after_a_study_from_modality(tmp_path, running):
    r = running(config(tmp_path, idle_timeout=120))  # the study stays in the spool
    study = generate_study(tmp_path / "in", 3, 1)
    r.node.dead_letters.record("1.2.3.4", "rejected by the FHIR server (a test's dead letter)")
    send(r.node.port, study)
    sender = (("calling_aet", SENDER),)
    got = wait_for(lambda: (s := r.samples()).get(("dicom_fhir_scp_associations_total", sender)) == 1 and s,
                   what="the association to be counted")
    assert got[("dicom_fhir_scp_instances_received_total", sender)] == 3
    assert got[("dicom_fhir_scp_instances_failed_total", sender)] == 0  # there from the association on
    assert got[("dicom_fhir_scp_instance_store_seconds_count", sender)] == 3
    spooled = sum(p.stat().st_size for p in (tmp_path / "spool" / study.study_uid).glob("*.dcm"))
    assert spooled > 0 and got[("dicom_fhir_scp_spool_bytes", ())] == spooled
    assert got[("dicom_fhir_scp_spool_studies", ())] == 1
    assert got[("dicom_fhir_scp_dead_letter_studies", ())] == 1
    assert got[("dicom_fhir_scp_study_delivery_seconds_count", ())] == 0
    assert ("process_resident_memory_bytes", ()) in got


def test_metrics_time_a_delivery_and_empty_the_spool_gauges(tmp_path, running):
    r = running(config(tmp_path))
    send(r.node.port, generate_study(tmp_path / "in", 2, 1))
    delivered = ("dicom_fhir_scp_deliveries_ok_total", (("calling_aet", SENDER),))
    got = wait_for(lambda: (s := r.samples()).get(delivered) == 1 and s, 30, "the delivery")
    assert got[("dicom_fhir_scp_study_delivery_seconds_count", ())] == 1
    assert got[("dicom_fhir_scp_studies_completed_total", ())] == 1
    assert got[("dicom_fhir_scp_spool_bytes", ())] == 0
    assert got[("dicom_fhir_scp_spool_studies", ())] == 0
    assert got[("dicom_fhir_scp_dead_letter_studies", ())] == 0
