"""scp.ops.readiness: the /readyz checks, each on its own (the node wiring: tests/test_health_node.py)."""

from __future__ import annotations

import os

import pytest

from scp.ops.readiness import CheckResult, DestinationCheck, Readiness, listening_check, spool_check


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Probe:
    """A destination's GET /metadata: counts its calls, raises while `down`."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    def __call__(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")


def test_the_report_runs_every_check_and_lists_the_failed_ones():
    report = Readiness({"a": lambda: CheckResult(False, "broken"), "b": lambda: CheckResult(True),
                        "c": lambda: CheckResult(False)}).report()
    assert report["ready"] is False
    assert report["failed"] == ["a", "c"]
    assert report["checks"]["b"] == {"ok": True}


def test_listening_follows_the_listener():
    up = {"value": False}
    check = listening_check(lambda: up["value"])
    assert check() == CheckResult(False, "the DICOM listener is not running")
    up["value"] = True
    assert check().ok


def test_a_writable_spool_with_room_is_ok_and_leaves_nothing_behind(tmp_path):
    assert spool_check(tmp_path, 0)() == CheckResult(True)
    assert os.listdir(tmp_path) == []


def test_a_spool_folder_replaced_by_a_file_is_not_writable(tmp_path):
    spool = tmp_path / "spool"
    spool.write_text("not a folder")  # chmod would not stop root; this stops everyone
    result = spool_check(spool, 0)()
    assert not result.ok
    assert "not writable" in result.detail and str(spool) in result.detail


def test_a_spool_below_min_free_bytes_fails_naming_the_setting(tmp_path):
    result = spool_check(tmp_path, 2**62)()
    assert not result.ok
    assert "operations.min_free_bytes" in result.detail


def test_a_reachable_destination_is_ok():
    probe = Probe()
    result = DestinationCheck(probe, lambda: None, window=60, where="GET http://fhir/metadata")()
    assert result.ok and probe.calls == 1


def test_an_unreachable_destination_fails_with_the_probe_error_and_the_window():
    probe = Probe()
    probe.down = True
    result = DestinationCheck(probe, lambda: None, window=60, where="GET http://fhir/metadata")()
    assert not result.ok
    assert "GET http://fhir/metadata: connection refused" in result.detail
    assert "operations.ready_window" in result.detail and "never" in result.detail


def test_a_recent_delivery_makes_an_unreachable_destination_ok_without_probing():
    clock, probe = FakeClock(), Probe()
    probe.down = True
    check = DestinationCheck(probe, lambda: clock.now - 59, window=60, where="x", clock=clock)
    assert check().ok and probe.calls == 0


def test_a_delivery_older_than_the_window_does_not_count():
    clock, probe = FakeClock(), Probe()
    probe.down = True
    check = DestinationCheck(probe, lambda: clock.now - 61, window=60, where="x", clock=clock)
    result = check()
    assert not result.ok and "last 61 s ago" in result.detail


def test_the_probe_answer_is_reused_for_cache_for_seconds_then_asked_again():
    clock, probe = FakeClock(), Probe()
    check = DestinationCheck(probe, lambda: None, window=60, where="x", cache_for=5, clock=clock)
    assert check().ok
    probe.down = True
    clock.now += 4.9
    assert check().ok and probe.calls == 1  # scrapes do not hammer the server
    clock.now += 0.2
    assert not check().ok and probe.calls == 2


@pytest.mark.parametrize("exc", [OSError("disk gone"), RuntimeError("bug")])
def test_a_check_that_raises_is_reported_failed_with_the_error(exc):
    def broken():
        raise exc
    report = Readiness({"spool": broken}).report()
    assert report["failed"] == ["spool"] and str(exc) in report["checks"]["spool"]["detail"]
