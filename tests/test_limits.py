"""The connection-limit rules as functions (scp.receive.limits), with a fake clock; the same
rules on the wire are in tests/test_connection_limits.py."""

from __future__ import annotations

import pytest

from mapping.errors import ConfigurationError
from scp.config import NodeConfig
from scp.receive.limits import Admissions, FloodLog, Limits, RateLimitedLog
from scp.receive.status import ASSOCIATE_REJECTIONS, REJECT_LIMIT
from tests.clocks import FakeClock


def test_the_first_event_of_a_key_is_logged_at_once_and_the_rest_of_its_interval_counted_into_the_next_line():
    clock = FakeClock()
    rate = RateLimitedLog(60, clock)
    assert rate.note("127.0.0.2") == 1
    assert [rate.note("127.0.0.2") for _ in range(5)] == [None] * 5
    clock.now += 60
    assert rate.note("127.0.0.2") == 6  # the five counted, and this one


def test_each_key_has_its_own_interval():
    rate = RateLimitedLog(60, FakeClock())
    assert rate.note("127.0.0.2") == 1
    assert rate.note("127.0.0.3") == 1


def test_counts_not_yet_in_a_line_are_handed_out_once_at_stop():
    rate = RateLimitedLog(60, FakeClock())
    for _ in range(4):
        rate.note("127.0.0.2")
    assert rate.pending() == {"127.0.0.2": 3}
    assert rate.pending() == {}


def test_the_rate_limit_remembers_a_bounded_number_of_keys():
    clock = FakeClock()
    rate = RateLimitedLog(60, clock, max_keys=10)
    for number in range(100):
        rate.note(f"10.0.0.{number}")
    assert len(rate._last) <= 10


def test_one_association_more_than_the_node_limit_is_refused_transient_local_limit_exceeded():
    refusal = Limits(max_associations=3, max_associations_per_peer=3).refusal("10.0.0.9", ["10.0.0.1", "10.0.0.2",
                                                                                         "10.0.0.3"])
    assert refusal is not None and refusal[0] == REJECT_LIMIT == (2, 3, 2)
    assert "node.max_associations = 3" in refusal[1]


def test_one_association_more_than_the_peer_limit_is_refused_while_other_addresses_fit():
    limits = Limits(max_associations=64, max_associations_per_peer=2)
    admitted = ["10.0.0.1", "10.0.0.1"]
    refusal = limits.refusal("10.0.0.1", admitted)
    assert refusal is not None and refusal[0] == REJECT_LIMIT
    assert "node.max_associations_per_peer = 2" in refusal[1]
    assert limits.refusal("10.0.0.2", admitted) is None


def test_the_limit_refusal_is_in_the_status_table():
    assert "local limit exceeded" in ASSOCIATE_REJECTIONS[REJECT_LIMIT]


def test_the_defaults_are_64_associations_8_per_peer_and_a_10_s_request_timeout():
    node = NodeConfig()
    assert (node.max_associations, node.max_associations_per_peer, node.request_timeout, node.stop_grace) == (
        64, 8, 10.0, 10.0)
    assert (node.acse_timeout, node.dimse_timeout, node.network_timeout, node.tls_handshake_timeout) == (
        30.0, 60.0, 60.0, 10.0)


@pytest.mark.parametrize("key, value", [
    ("max_associations", 0), ("max_associations_per_peer", 0), ("max_associations_per_peer", 65),
    ("request_timeout", 0), ("acse_timeout", -1), ("dimse_timeout", 0), ("network_timeout", 0),
    ("tls_handshake_timeout", 0), ("stop_grace", -1),
])
def test_a_limit_or_timeout_out_of_range_is_a_configuration_error_naming_the_key(key, value):
    with pytest.raises(ConfigurationError, match=f"node.{key}"):
        NodeConfig(**{key: value})


def test_admissions_count_every_key_against_the_node_limits():
    admissions = Admissions(Limits(max_associations=3, max_associations_per_peer=2))
    assert admissions.admit((0, 1), "10.0.0.1") is None
    assert admissions.admit((1, 1), "10.0.0.1") is None  # another worker's association, same table
    refusal = admissions.admit((0, 2), "10.0.0.1")
    assert refusal is not None and refusal[0] == REJECT_LIMIT
    assert admissions.admit((0, 2), "10.0.0.2") is None
    assert admissions.admit((1, 2), "10.0.0.3") is not None  # 3 open: the node limit
    admissions.release((0, 1))
    assert admissions.admit((1, 2), "10.0.0.3") is None


def test_a_workers_admissions_are_forgotten_when_it_ends():
    admissions = Admissions(Limits(max_associations=2, max_associations_per_peer=2))
    admissions.admit((0, 1), "10.0.0.1")
    admissions.admit((0, 2), "10.0.0.1")
    assert admissions.admit((1, 1), "10.0.0.1") is not None
    assert admissions.release_where(lambda key: key[0] == 0) == 2
    assert admissions.admit((1, 1), "10.0.0.1") is None


def test_the_flood_log_says_one_line_per_address_and_interval_whoever_reports_it(caplog):
    clock = FakeClock()
    flood = FloodLog(request_timeout=10, interval=60, clock=clock)
    with caplog.at_level("WARNING", logger="scp.receive.limits"):
        for _ in range(3):  # e.g. from two workers
            flood.timed_out("10.0.0.9")
        clock.now += 61
        flood.timed_out("10.0.0.9")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[1].startswith("3 connection(s) from 10.0.0.9")


def test_the_admissions_table_counts_the_associations_open_now():
    admissions = Admissions(Limits(max_associations=3, max_associations_per_peer=3))
    admissions.admit((0, 1), "10.0.0.1")
    admissions.admit((1, 1), "10.0.0.2")
    assert len(admissions) == 2
    admissions.release((0, 1))
    assert len(admissions) == 1
