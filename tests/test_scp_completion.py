"""Per-study idle completion, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import threading

import pytest

from scp.pipeline.cache import ParseAheadCache
from scp.pipeline.completion import CompletionTracker
from tests.clocks import FakeClock


@pytest.fixture
def clock():
    return FakeClock()


def test_a_study_is_complete_after_idle_timeout_without_a_new_instance(clock):
    tracker = CompletionTracker(30, clock=clock)
    tracker.arrived("1.1", "1.1.1")
    clock.now += 29.9
    assert tracker.poll() == []
    clock.now += 0.1
    [part] = tracker.poll()
    assert (part.study_uid, part.sop_uids) == ("1.1", frozenset({"1.1.1"}))


def test_each_instance_restarts_the_timer_whichever_association_sent_it(clock):
    tracker = CompletionTracker(30, clock=clock)
    tracker.arrived("1.1", "1.1.1")
    clock.now += 20
    tracker.arrived("1.1", "1.1.2")  # another sender, another association: same study
    clock.now += 20
    assert tracker.poll() == []
    clock.now += 10
    [part] = tracker.poll()
    assert part.sop_uids == {"1.1.1", "1.1.2"}


def test_a_study_split_over_two_associations_with_a_short_pause_completes_once(clock):
    tracker = CompletionTracker(2, clock=clock)
    for sop in ("1.1.1", "1.1.2", "1.1.3"):  # the first association
        tracker.arrived("1.1", sop)
    clock.now += 0.5  # the pause, shorter than the idle timeout
    assert tracker.poll() == []
    for sop in ("1.1.4", "1.1.5", "1.1.6"):  # the second association
        tracker.arrived("1.1", sop)
    clock.now += 2
    [part] = tracker.poll()
    assert part.sop_uids == {"1.1.1", "1.1.2", "1.1.3", "1.1.4", "1.1.5", "1.1.6"}
    clock.now += 10  # many idle timeouts later: no second completion
    assert tracker.poll() == [] and tracker.waiting() == {}


def test_studies_complete_independently(clock):
    tracker = CompletionTracker(10, clock=clock)
    tracker.arrived("1.1", "1.1.1")
    clock.now += 5
    tracker.arrived("1.2", "1.2.1")
    clock.now += 5
    assert [p.study_uid for p in tracker.poll()] == ["1.1"]
    clock.now += 5
    assert [p.study_uid for p in tracker.poll()] == ["1.2"]


def test_instances_after_a_completion_form_a_new_part(clock):
    tracker = CompletionTracker(10, clock=clock)
    tracker.arrived("1.1", "1.1.1")
    clock.now += 10
    assert tracker.poll()[0].sop_uids == {"1.1.1"}
    tracker.arrived("1.1", "1.1.2")
    clock.now += 10
    [second] = tracker.poll()
    assert second.sop_uids == {"1.1.2"}
    assert tracker.poll() == []


def test_a_resent_instance_counts_once(clock):
    tracker = CompletionTracker(10, clock=clock)
    tracker.arrived("1.1", "1.1.1")
    tracker.arrived("1.1", "1.1.1")
    assert tracker.waiting() == {"1.1": 1}


def test_studies_resumed_from_the_spool_complete_idle_timeout_after_the_start(clock):
    tracker = CompletionTracker(10, clock=clock)
    tracker.resume({"1.1": {"1.1.1", "1.1.2"}})
    assert tracker.next_due() == clock.now + 10
    clock.now += 10
    assert tracker.poll()[0].sop_uids == {"1.1.1", "1.1.2"}


def test_idle_timeout_must_be_positive():
    with pytest.raises(ValueError, match="idle_timeout"):
        CompletionTracker(0)


def test_the_timer_thread_hands_each_completed_part_on():
    completed = []
    done = threading.Event()

    def on_complete(study_uid, sop_uids):
        completed.append((study_uid, sop_uids))
        done.set()

    tracker = CompletionTracker(0.05, on_complete)
    tracker.start()
    try:
        tracker.arrived("1.1", "1.1.1")
        assert done.wait(5)
    finally:
        tracker.stop()
    assert completed == [("1.1", frozenset({"1.1.1"}))]


def test_an_error_in_the_callback_is_logged_and_the_timer_keeps_running(caplog):
    calls = []
    second = threading.Event()

    def on_complete(study_uid, sop_uids):
        calls.append(study_uid)
        if study_uid == "1.1":
            raise RuntimeError("boom")
        second.set()

    tracker = CompletionTracker(0.05, on_complete)
    tracker.start()
    try:
        tracker.arrived("1.1", "1.1.1")
        tracker.arrived("1.2", "1.2.1")
        assert second.wait(5)
    finally:
        tracker.stop()
    assert calls == ["1.1", "1.2"]
    assert "study 1.1" in caplog.text


def test_the_parse_ahead_cache_measures_quiet_since_the_last_arrival_of_any_study(clock):
    cache = ParseAheadCache(clock)
    cache.arrived("1.1", "1.1.1")
    clock.now += 2
    cache.arrived("1.2", "1.2.1")
    clock.now += 3
    assert cache.quiet_for() == 3
    assert cache.waiting() == {"1.1": {"1.1.1"}, "1.2": {"1.2.1"}}


def test_the_parse_ahead_cache_forgets_instances_of_a_completed_part(clock):
    cache = ParseAheadCache(clock)
    cache.arrived("1.1", "1.1.1")
    cache.arrived("1.1", "1.1.2")
    cache.completed("1.1", {"1.1.1"})
    assert cache.waiting() == {"1.1": {"1.1.2"}}
    cache.completed("1.1", {"1.1.2"})
    assert cache.waiting() == {}
