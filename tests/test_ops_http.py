"""scp.ops.http: /healthz and Prometheus /metrics over real HTTP (port 0)."""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.request

import pytest

from mapping.errors import ConfigurationError
from scp.config import OperationsConfig
from scp.ops.metrics import COUNTERS, Metrics
from scp.ops.http import start_ops_server

ENABLED = OperationsConfig(http_enabled=True, http_bind="127.0.0.1", http_port=0)
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) (-?[0-9]+(?:\.[0-9]+)?)$")


@pytest.fixture
def metrics():
    return Metrics()


@pytest.fixture
def depth():
    return {"value": 0}


@pytest.fixture
def ops(metrics, depth):
    handle = start_ops_server(ENABLED, metrics, lambda: depth["value"])
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
    """Prometheus text format 0.0.4 → ({sample: value}, {metric: type}); asserts the line grammar."""
    samples, types, helps = {}, {}, set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in samples, f"TYPE for {name} after its sample"
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not an exposition line: {line!r}"
            samples[m.group(1)] = float(m.group(2))
    assert set(types) == set(samples) == helps
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
    samples, _ = parse_exposition(get(ops, "/metrics")[2])
    assert samples["dicom_fhir_scp_instances_received_total"] == 7
    assert samples["dicom_fhir_scp_deliveries_failed_total"] == 1
    assert samples["dicom_fhir_scp_deliveries_ok_total"] == 0
    assert samples["dicom_fhir_scp_spool_studies"] == 3
    depth["value"] = 0
    assert parse_exposition(get(ops, "/metrics")[2])[0]["dicom_fhir_scp_spool_studies"] == 0


def test_other_paths_are_404(ops):
    assert get(ops, "/")[0] == 404
    assert get(ops, "/metrics/x")[0] == 404


def test_a_failing_spool_depth_is_a_failed_scrape_not_a_zero(metrics):
    def broken():
        raise OSError("spool unreadable")
    handle = start_ops_server(ENABLED, metrics, broken)
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
    handle = start_ops_server(OperationsConfig(http_enabled=True, http_port=0), Metrics(), lambda: 0)
    try:
        assert handle.host == "127.0.0.1"
    finally:
        handle.stop()


def test_off_by_default_starts_nothing():
    assert OperationsConfig().http_enabled is False
    handle = start_ops_server(OperationsConfig(http_port=0), Metrics(), lambda: 0)
    assert handle.port is None
    handle.stop()


def test_stop_closes_the_port(metrics):
    handle = start_ops_server(ENABLED, metrics, lambda: 0)
    port = handle.port
    handle.stop()
    handle.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_port_in_use_is_a_configuration_error_naming_the_setting(ops, metrics):
    taken = OperationsConfig(http_enabled=True, http_bind="127.0.0.1", http_port=ops.port)
    with pytest.raises(ConfigurationError, match="operations.http_port"):
        start_ops_server(taken, metrics, lambda: 0)
