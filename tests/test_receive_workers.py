"""Receive in several processes (node.workers = 2): the node as `serve` runs it, real senders.

Rules: a study whose instances arrive on associations in different workers completes once
with all of them; a worker killed with SIGKILL loses nothing it acknowledged and is started
again; the coordinator killed with SIGKILL takes its workers along and a restart delivers
every acknowledged instance; SIGTERM stops every process; the connection limits and the
metrics are the node's, not each worker's. Both ways of sharing the port are checked
(node.worker_sockets = "reuseport" and "handover").
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.clocks import wait_for
from tests.conftest import require_tool
from tests.bigfiles import large_instance
from tests.dicomgen import generate_study
from tests.scp_node import NodeProcess, instance_uids
from tests.scu import associate
from tests.test_operations_node import metrics
from tests.test_crash_safety import StreamingSender, sigkill, storescu_in_background, wait_for_partial_data_set

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

MODES = ("reuseport", "handover")
WORKER_PIDS = re.compile(r"with 2 receive workers \((\w+)\), pids (\d+) (\d+)")


def config(mode: str, **node) -> str:
    keys = {"worker_sockets": mode, **node}
    return "[node]\n" + "".join(f"{key} = {value!r}\n" for key, value in keys.items())


def workers_node(root, mode: str, *, workers: int = 2, extra: str = "", **kwargs) -> NodeProcess:
    """A node with `workers` receive workers: the flag, which CI's DICOM_FHIR_SCP_NODE_WORKERS does not override."""
    return NodeProcess(root, "--workers", str(workers), config=config(mode) + extra, **kwargs)


def worker_pids(node: NodeProcess) -> list[int]:
    """The receive workers' PIDs as the node logged them at its (latest) start."""
    found = WORKER_PIDS.findall(node.log())
    assert found, f"no 'with 2 receive workers' line in the node's log:\n{node.log()[-2000:]}"
    return [int(found[-1][1]), int(found[-1][2])]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def delivered_instances(node: NodeProcess, study_uid: str) -> set[str]:
    document = node.output_of(study_uid)
    return instance_uids(document) if document is not None else set()


@pytest.mark.parametrize("mode", MODES)
def test_a_study_sent_over_four_storescu_associations_at_once_is_delivered_once_with_every_instance(
        tmp_path, mode):
    study = generate_study(tmp_path / "study", 40, 2)
    parts = []
    for index in range(4):
        part = tmp_path / f"part{index}"
        part.mkdir()
        for path in study.files[index::4]:
            (part / path.name).symlink_to(path)
        parts.append(part)
    node = workers_node(tmp_path / "node", mode, idle_timeout=2).start()
    try:
        env = {**os.environ, "TCP_NODELAY": "1"}
        senders = [subprocess.Popen([require_tool("storescu"), "-aec", "FHIRSCP", "+sd", "127.0.0.1", str(node.port),
                                     str(part)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for part in parts]
        for sender in senders:
            assert sender.wait(60) == 0, sender.stderr.read().decode(errors="replace")
        node.wait_for_deliveries(study.study_uid)
        assert delivered_instances(node, study.study_uid) == set(study.sop_uids)
        wait_for(lambda: not node.spooled(study.study_uid), 10, "the spool to empty")
        assert len(node.deliveries(study.study_uid)) == 1  # once, not once per worker
    finally:
        assert node.stop() == 0


def test_with_the_hand_over_concurrent_associations_go_to_different_workers_and_complete_as_one_study(tmp_path):
    study = generate_study(tmp_path / "study", 20, 1)
    node = workers_node(tmp_path / "node", "handover", idle_timeout=2).start()
    try:
        associations = [associate(node.port, calling=f"SCU{index}") for index in range(2)]
        assert all(a.is_established for a in associations)
        for index, (path, _) in enumerate(zip(study.files, study.sop_uids)):
            assert associations[index % 2].send_c_store(path).Status == 0x0000
        for assoc in associations:
            assoc.release()
        node.wait_for_deliveries(study.study_uid)
        assert delivered_instances(node, study.study_uid) == set(study.sop_uids)
        released = [line for line in node.log().splitlines() if "released after" in line]
        assert {re.search(r"/w(\d)", line)[1] for line in released} == {"0", "1"}, released
        assert len(node.deliveries(study.study_uid)) == 1
    finally:
        assert node.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_worker_killed_mid_stream_loses_nothing_it_acknowledged_and_is_started_again(tmp_path, mode):
    study = generate_study(tmp_path / "study", 40, 2)
    node = workers_node(tmp_path / "node", mode, idle_timeout=2).start()
    try:
        sender = StreamingSender(node.port, study).start()
        sender.wait_acknowledged(10)
        for pid in worker_pids(node):  # the one serving the association is among them
            os.kill(pid, 9)
        sender.join()
        acknowledged = set(sender.acknowledged)
        assert len(acknowledged) >= 10
        wait_for(lambda: node.log().count("started again") >= 2, 30, "both workers started again")
        assert "ended unexpectedly (killed by SIGKILL)" in node.log()
        resend = StreamingSender(node.port, study).start()  # the sender tries again, as a PACS does
        resend.join(60)
        assert resend.error is None and len(resend.acknowledged) == 40, (resend.error, resend.failed)
        wait_for(lambda: delivered_instances(node, study.study_uid) == set(study.sop_uids), 30,
                 "every instance delivered")
        assert acknowledged <= delivered_instances(node, study.study_uid)
    finally:
        assert node.stop() == 0


def test_a_killed_worker_leaves_no_partly_received_data_set_while_the_node_goes_on(tmp_path):
    # A large data set arrives into <spool>/.incoming, its file named for the worker receiving it:
    # the coordinator removes a killed worker's files at once, not at the node's next start.
    big = tmp_path / "big.dcm"
    large_instance(big, 256 << 20)
    node = workers_node(tmp_path / "node", "reuseport", idle_timeout=600).start()
    incoming = node.spool / ".incoming"
    storescu = storescu_in_background(node.port, big)
    try:
        wait_for_partial_data_set(incoming, 20 << 20)
        [partial] = list(incoming.glob("*.tmp"))
        receiving = int(partial.name.split("-")[0])
        assert receiving in worker_pids(node)
        os.kill(receiving, 9)
        storescu.wait(30)
        wait_for(lambda: "started again" in node.log(), 30, "the worker started again")
        assert not partial.exists()
        assert "1 data set(s) it was receiving removed" in node.log()
        study = generate_study(tmp_path / "study", 3, 1)
        assoc = associate(node.port)  # the node goes on receiving
        assert assoc.is_established
        assert [assoc.send_c_store(path).Status for path in study.files] == [0, 0, 0]
        assoc.release()
    finally:
        if storescu.poll() is None:
            storescu.kill()
        assert node.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_the_coordinator_killed_mid_stream_takes_its_workers_along_and_a_restart_delivers_every_acknowledged_instance(
        tmp_path, mode):
    study = generate_study(tmp_path / "study", 40, 2)
    node = workers_node(tmp_path / "node", mode, idle_timeout=600).start()
    pids = worker_pids(node)
    sender = StreamingSender(node.port, study).start()
    sender.wait_acknowledged(10)
    sigkill(node)
    sender.join()
    acknowledged = set(sender.acknowledged)
    wait_for(lambda: not any(map(alive, pids)), 10, "the workers to exit after their coordinator")
    assert acknowledged <= node.spooled(study.study_uid)
    node.start(idle_timeout=1)
    try:
        wait_for(lambda: acknowledged <= delivered_instances(node, study.study_uid), 30,
                 "every acknowledged instance delivered after the restart")
    finally:
        assert node.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_stops_every_process_and_exits_0(tmp_path, mode):
    node = workers_node(tmp_path / "node", mode).start()
    pids = worker_pids(node)
    assert all(map(alive, pids))
    assert node.stop() == 0
    assert not any(map(alive, pids))


@pytest.mark.parametrize("mode", MODES)
def test_the_per_peer_limit_counts_the_associations_of_every_worker(tmp_path, mode):
    node = NodeProcess(tmp_path / "node", "--workers", "2", config=config(mode, max_associations_per_peer=2)).start()
    associations = []
    try:
        associations = [associate(node.port, calling=f"SCU{index}", timeout=10) for index in range(4)]
        established = [a.is_established for a in associations]
        assert established.count(True) == 2, established
        assert all(a.is_rejected for a in associations if not a.is_established)
    finally:
        for assoc in associations:
            if assoc.is_established:
                assoc.release()
        assert node.stop() == 0


def test_the_metrics_count_what_every_worker_received(tmp_path):
    study = generate_study(tmp_path / "study", 12, 1)
    node = workers_node(tmp_path / "node", "handover",
                        extra="[operations]\nhttp_enabled = true\nhttp_port = 0\n").start()
    try:
        port = node.ops_port()
        associations = [associate(node.port, calling="METRICS") for _ in range(2)]
        for index, path in enumerate(study.files):
            assert associations[index % 2].send_c_store(path).Status == 0x0000
        for assoc in associations:
            assoc.release()
        counted = wait_for(lambda: (m := metrics(port))["dicom_fhir_scp_instances_received_total"] == 12 and m, 10,
                           "12 instances counted")
        assert counted["dicom_fhir_scp_associations_total"] == 2
    finally:
        assert node.stop() == 0


def test_a_node_with_one_worker_receives_in_its_own_process(tmp_path):
    node = NodeProcess(tmp_path / "node", "--workers", "1").start()
    try:
        assert "receive workers" not in node.log()
        assert not WORKER_PIDS.search(node.log())
    finally:
        assert node.stop() == 0


def test_sigterm_to_every_process_as_systemd_sends_it_stops_the_node_in_order(tmp_path):
    node = workers_node(tmp_path / "node", "reuseport").start()
    pids = worker_pids(node)
    for pid in pids:  # systemd signals the whole cgroup; the workers leave the stop to their coordinator
        os.kill(pid, 15)
    assert node.stop() == 0
    assert "ended unexpectedly" not in node.log()
    assert not any(map(alive, pids))
