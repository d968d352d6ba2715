"""benchmarks/ingest.py's aggregate harness: the rules behind its figures (no timing here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("ingest_benchmark", REPO / "benchmarks" / "ingest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ingest = load_benchmark()


def run(receiver: str, rate: float, *, nodelay: bool = True, received: int = 2000, problem: str = ""):
    return ingest.AggregateRun(receiver, nodelay, 2000 / rate, received, 2000, problem)


def test_each_round_starts_the_receivers_one_further_on():
    receivers = ["a", "b", "c"]
    assert [ingest.rotated(receivers, i) for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_worker_keys_are_written_only_for_the_modes_that_ask_for_them():
    today = ingest.node_modes(["workers1"], 2, knows_workers=False)
    assert today[0].config() is None
    workers1, reuseport, handover = ingest.node_modes(["workers1", "reuseport", "handover"], 2, knows_workers=True)
    assert workers1.config() == "[node]\nworkers = 1\n"
    assert reuseport.config() == '[node]\nworkers = 2\nworker_sockets = "reuseport"\n'
    assert handover.config() == '[node]\nworkers = 2\nworker_sockets = "handover"\n'


@pytest.mark.parametrize("mode", ["reuseport", "handover"])
def test_two_worker_modes_are_refused_for_a_node_without_workers(mode):
    with pytest.raises(ValueError, match=f"--modes {mode}: .*no node.workers"):
        ingest.node_modes([mode], 2, knows_workers=False)


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown mode 'fork'"):
        ingest.node_modes(["fork"], 2, knows_workers=True)


def test_a_run_that_lost_an_instance_is_a_failure_not_a_figure():
    modes = ingest.node_modes(["workers1"], 2, knows_workers=True)
    runs = [run("node workers1", 900.0, received=1999), run("node workers1", 500.0),
            run(ingest.STORESCP_FORK, 400.0)]
    rates = ingest.medians(runs)
    assert rates[("node workers1", True)] == pytest.approx(500.0)
    missed = ingest.aggregate_missed(runs, rates, modes)
    assert missed == ["node workers1 (TCP_NODELAY=1 senders): received 1999 of 2000"]


def test_the_aggregate_target_is_the_best_node_mode_against_storescp_fork_with_nodelay_senders():
    modes = ingest.node_modes(["workers1", "reuseport"], 2, knows_workers=True)
    met = [run("node workers1", 300.0), run("node reuseport", 600.0), run(ingest.STORESCP_FORK, 600.0),
           run(ingest.STORESCP_FORK, 50.0, nodelay=False)]  # default senders carry no target
    assert ingest.aggregate_missed(met, ingest.medians(met), modes) == []
    missed = [run("node workers1", 300.0), run("node reuseport", 590.0), run(ingest.STORESCP_FORK, 600.0)]
    assert ["best mode" in m for m in ingest.aggregate_missed(missed, ingest.medians(missed), modes)] == [True]


def test_without_a_complete_storescp_fork_run_the_target_counts_as_missed():
    modes = ingest.node_modes(["workers1"], 2, knows_workers=True)
    runs = [run("node workers1", 300.0), run(ingest.STORESCP_FORK, 600.0, problem="storescu 0 exited 1")]
    missed = ingest.aggregate_missed(runs, ingest.medians(runs), modes)
    assert len(missed) == 2 and "no complete node or storescp --fork run" in missed[1]


def test_the_median_of_three_rounds_counts():
    runs = [run(ingest.DISCARD_NAME, rate) for rate in (100.0, 400.0, 300.0)]
    assert ingest.medians(runs)[(ingest.DISCARD_NAME, True)] == pytest.approx(300.0)


def test_ratios_compare_best_node_mode_socket_modes_and_worker_counts():
    modes = ingest.node_modes(["workers1", "reuseport", "handover"], 2, knows_workers=True)
    rates = {"node workers1": 200.0, "node reuseport": 600.0, "node handover": 400.0,
             ingest.STORESCP_FORK: 500.0, ingest.DISCARD_NAME: 300.0}
    assert dict(ingest.aggregate_ratios(rates, modes)) == pytest.approx({
        "node (reuseport)/storescp --fork": 1.2, "node (reuseport)/discard": 2.0,
        "reuseport/handover": 1.5, "workers 2 (best)/workers 1": 3.0})


def test_each_sender_gets_an_even_contiguous_share(tmp_path: Path):
    files = []
    for i in range(10):
        files.append(tmp_path / f"{i:02d}.dcm")
        files[-1].write_bytes(b"x")
    folders = ingest.split_for_senders(files, 4, tmp_path / "senders")
    shares = [sorted(p.name for p in folder.iterdir()) for folder in folders]
    assert [len(s) for s in shares] == [2, 3, 2, 3]
    assert sum(shares, []) == [p.name for p in files]


def test_the_single_part_runs_the_node_once_per_workers_value():
    assert ingest.single_nodes((1, 2), knows_workers=True) == {"node w1": 1, "node w2": 2}


def test_the_single_part_runs_a_node_without_workers_with_its_default():
    assert ingest.single_nodes((1, 2), knows_workers=False) == {"node": None}


@pytest.mark.parametrize("text", ["0", "1,x", "", "-2"])
def test_single_workers_are_positive_numbers(text):
    with pytest.raises(ingest.argparse.ArgumentTypeError):
        ingest.workers_list(text)


def test_single_workers_are_read_comma_separated():
    assert ingest.workers_list("1,2,4") == (1, 2, 4)
