"""scp.ops.metrics: the node's counters (fixed names, thread-safe)."""

from __future__ import annotations

import threading

import pytest

from scp.ops.metrics import COUNTERS, Metrics

NAMES = ("instances_received", "instances_failed", "associations", "studies_completed",
         "deliveries_ok", "deliveries_failed")


def test_every_counter_the_node_uses_exists_and_starts_at_zero():
    assert set(NAMES) == set(COUNTERS)
    assert Metrics().snapshot() == dict.fromkeys(NAMES, 0)


def test_inc_adds_one_by_default_and_n_when_given():
    m = Metrics()
    m.inc("instances_received")
    m.inc("instances_received", 4)
    m.inc("deliveries_ok", 0)
    assert m.snapshot()["instances_received"] == 5
    assert m.snapshot()["deliveries_ok"] == 0


def test_an_unknown_counter_name_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="instances_recieved"):
        Metrics().inc("instances_recieved")


def test_counters_never_go_down():
    with pytest.raises(ValueError, match="n:"):
        Metrics().inc("associations", -1)


def test_a_snapshot_is_a_copy_not_a_live_view():
    m = Metrics()
    snap = m.snapshot()
    snap["associations"] = 99
    m.inc("associations")
    assert m.snapshot()["associations"] == 1
    assert snap["associations"] == 99


def test_concurrent_increments_are_all_counted():
    m = Metrics()
    threads = [threading.Thread(target=lambda: [m.inc("instances_received") for _ in range(5000)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.snapshot()["instances_received"] == 40000
