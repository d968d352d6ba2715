"""scp.ops.http: /healthz, /readyz and Prometheus /metrics over real HTTP (port 0)."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mapping.errors import ConfigurationError
from scp.config import OperationsConfig
from scp.ops.metrics import COUNTERS, Metrics
from scp.ops.http import start_ops_server
from scp.ops.readiness import CheckResult, Readiness
from tests.clocks import wait_for

ENABLED = OperationsConfig(http_enabled=True, http_bind="127.0.0.1", http_port=0)


@pytest.fixture
def depth():
    return {"value": 0}


@pytest.fixture
def metrics(depth):
    m = Metrics()
    m.watch("spool_studies", lambda: depth["value"])
    return m


@pytest.fixture
def ops(metrics):
    handle = start_ops_server(ENABLED, metrics)
    yield handle
    handle.stop()


def get(handle, path):
    """(status, content type, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{handle.port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def parse_exposition(text):
    """Prometheus text format → ({sample: value summed over labels}, {metric: type}), by
    prometheus_client's own parser (it raises on a malformed line)."""
    samples, types = {}, {}
    assert text.endswith("\n")
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"no HELP for {family.name}"
        types[family.name + ("_total" if family.type == "counter" else "")] = family.type
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0) + sample.value
    return samples, types


def test_healthz_answers_200_ok(ops):
    status, _, body = get(ops, "/healthz")
    assert (status, body.strip()) == (200, "ok")


def test_metrics_is_prometheus_text_format_0_0_4(ops):
    status, content_type, body = get(ops, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    samples, types = parse_exposition(body)
    for name in COUNTERS:
        assert types[f"dicom_fhir_scp_{name}_total"] == "counter"
    assert types["dicom_fhir_scp_spool_studies"] == "gauge"


def test_metrics_show_the_counters_and_the_spool_depth_at_scrape_time(ops, metrics, depth):
    metrics.inc("instances_received", 7)
    metrics.inc("deliveries_failed")
    depth["value"] = 3
    samples, types = parse_exposition(get(ops, "/metrics")[2])
    assert samples["dicom_fhir_scp_instances_received_total"] == 7
    assert samples["dicom_fhir_scp_deliveries_failed_total"] == 1
    # Counted per calling AE: before any delivery the family is there, without samples.
    assert types["dicom_fhir_scp_deliveries_ok_total"] == "counter"
    assert samples.get("dicom_fhir_scp_deliveries_ok_total", 0) == 0
    assert samples["dicom_fhir_scp_spool_studies"] == 3
    depth["value"] = 0
    assert parse_exposition(get(ops, "/metrics")[2])[0]["dicom_fhir_scp_spool_studies"] == 0


def test_other_paths_are_404(ops):
    assert get(ops, "/")[0] == 404
    assert get(ops, "/metrics/x")[0] == 404


def test_a_failing_spool_depth_is_a_failed_scrape_not_a_zero(metrics):
    def broken():
        raise OSError("spool unreadable")
    metrics.watch("spool_studies", broken)
    handle = start_ops_server(ENABLED, metrics)
    try:
        status, _, body = get(handle, "/metrics")
        assert status == 500 and "spool unreadable" in body
        assert get(handle, "/healthz")[0] == 200
    finally:
        handle.stop()


def test_requests_are_logged_at_debug_only(ops, caplog):
    with caplog.at_level(logging.DEBUG, logger="scp.ops.http"):
        get(ops, "/healthz")
        get(ops, "/nope")
    records = [r for r in caplog.records if r.name == "scp.ops.http"]
    assert records and all(r.levelno == logging.DEBUG for r in records)


def test_binds_to_localhost_by_default():
    assert OperationsConfig().http_bind == "127.0.0.1"
    handle = start_ops_server(OperationsConfig(http_enabled=True, http_port=0), Metrics())
    try:
        assert handle.host == "127.0.0.1"
    finally:
        handle.stop()


def test_off_by_default_starts_nothing():
    assert OperationsConfig().http_enabled is False
    handle = start_ops_server(OperationsConfig(http_port=0), Metrics())
    assert handle.port is None
    handle.stop()


def test_stop_closes_the_port(metrics):
    handle = start_ops_server(ENABLED, metrics)
    port = handle.port
    handle.stop()
    handle.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_port_in_use_is_a_configuration_error_naming_the_setting(ops, metrics):
    taken = OperationsConfig(http_enabled=True, http_bind="127.0.0.1", http_port=ops.port)
    with pytest.raises(ConfigurationError, match="operations.http_port"):
        start_ops_server(taken, metrics)


def readyz(checks):
    handle = start_ops_server(ENABLED, Metrics(), Readiness(checks))
    try:
        status, content_type, body = get(handle, "/readyz")
        assert content_type == "application/json"
        return status, json.loads(body)
    finally:
        handle.stop()


def test_readyz_is_200_when_every_check_passes():
    status, body = readyz({"listening": lambda: CheckResult(True), "spool": lambda: CheckResult(True)})
    assert status == 200
    assert body == {"ready": True, "checks": {"listening": {"ok": True}, "spool": {"ok": True}}, "failed": []}


def test_readyz_is_503_naming_the_failed_check_and_why():
    status, body = readyz({"listening": lambda: CheckResult(True),
                           "spool": lambda: CheckResult(False, "spool folder /x is not writable")})
    assert status == 503
    assert body["ready"] is False and body["failed"] == ["spool"]
    assert body["checks"]["spool"] == {"ok": False, "detail": "spool folder /x is not writable"}
    assert body["checks"]["listening"] == {"ok": True}


def test_a_check_that_raises_is_a_failed_check_not_a_500():
    def broken():
        raise OSError("disk on fire")
    status, body = readyz({"spool": broken})
    assert status == 503 and body["failed"] == ["spool"]
    assert "disk on fire" in body["checks"]["spool"]["detail"]


def test_readyz_without_checks_is_ready():
    assert readyz({})[0] == 200


def test_a_client_resetting_the_connection_costs_one_debug_line_not_a_traceback(ops, caplog, capfd):
    # HAProxy's health checks reset the connection as soon as they have read the status line
    import socket
    import struct
    import time

    caplog.set_level(logging.DEBUG, logger="scp.ops.http")
    with socket.create_connection(("127.0.0.1", ops.port)) as client:
        client.sendall(b"GET /rea")  # the server waits in readline for the rest
        time.sleep(0.2)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    wait_for(lambda: "closed the connection early" in caplog.text, 5, "the log line of the reset")
    assert "closed the connection early (ConnectionResetError)" in caplog.text
    assert "Traceback" not in capfd.readouterr().err
    assert get(ops, "/healthz")[0] == 200  # and it goes on serving
