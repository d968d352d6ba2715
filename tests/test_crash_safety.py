"""Crash safety: the node killed with SIGKILL at random moments never loses an acknowledged instance.

Each trial starts the node (`dicom-fhir-scp serve`, tests/scp_node.py), streams a
40-instance study to it from pynetdicom in this process (so the test knows exactly
which C-STOREs got a success status back), and SIGKILLs the node at a moment drawn
from a seeded random generator: most trials while the study is being sent, some in
the completion/delivery window right after it. The node is then restarted on the same
spool. Rules checked after every kill:

- an output file present right after the kill is whole (valid JSON, a valid R4B Bundle);
- after the restart every acknowledged instance is in the output file and, in the
  trials with a FHIR sink, in the ImagingStudy the FHIR engine holds (exactly one);
- nothing is left behind: no temporary file in the output folder, the spool empties.

The seed is fixed, so a failing trial replays the same kill moment (give or take the
scheduler). The last test is the graceful counterpart: SIGTERM mid-stream.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy
from pynetdicom import _config as pynetdicom_config

from scp.store.layout import LOCK
from tests.bigfiles import large_instance
from tests.clocks import wait_for
from tests.conftest import require_tool
from tests.dicomgen import GeneratedStudy, generate_study
from tests.fhir_engine import FhirEngine, fhir_engine, fhir_engine_process  # noqa: F401
from tests.scp_node import NodeProcess, instance_uids
from tests.scu import associate

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

SEED = 20261124
TRIALS = 10
INSTANCES = 40
IDLE_TIMEOUT = 1.0


class StreamingSender:
    """Sends a study over one association on a thread; records every SOP UID answered with success."""

    def __init__(self, port: int, study: GeneratedStudy, ae_title: str = "FHIRSCP") -> None:
        self.port = port
        self.study = study
        self.ae_title = ae_title
        self.acknowledged: list[str] = []
        self.failed: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self._progress = threading.Condition()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> "StreamingSender":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            assoc = associate(self.port, calling="CRASHSCU", called=self.ae_title, timeout=10)
            if not assoc.is_established:
                return
            for path, sop_uid in zip(self.study.files, self.study.sop_uids):
                if not assoc.is_established:
                    break
                status = assoc.send_c_store(path)
                code = getattr(status, "Status", None)
                with self._progress:
                    if code == 0x0000:
                        self.acknowledged.append(sop_uid)
                    elif code is not None:
                        self.failed.append((sop_uid, code))
                    self._progress.notify_all()
                if code is None:  # no answer: the node is gone
                    break
            if assoc.is_established:
                assoc.release()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.done.set()
            with self._progress:
                self._progress.notify_all()

    def wait_acknowledged(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._progress:
            while len(self.acknowledged) < count and not self.done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"only {len(self.acknowledged)} of {count} instances acknowledged")
                self._progress.wait(remaining)

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the sender did not finish"


def storescu_in_background(port: int, path: Path) -> subprocess.Popen:
    """dcmtk storescu sending one file (TCP_NODELAY=1), while the test does something to the node."""
    return subprocess.Popen([require_tool("storescu"), "-aec", "FHIRSCP", "127.0.0.1", str(port), str(path)],
                            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_for_partial_data_set(incoming: Path, size: int) -> None:
    wait_for(lambda: any(p.stat().st_size > size for p in incoming.glob("*.tmp")), 60,
             "a partly received data set in the spool's .incoming folder")


def sigkill(node: NodeProcess) -> None:
    node.process.kill()
    node.process.wait(10)
    node.process = None


def temporary_files(folder: Path) -> list[str]:
    """Hidden and temp files, the spool's lock file (<spool_dir>/.lock, kept on purpose) left out."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and (p.name.startswith(".") or ".tmp" in p.name)
                  and p != folder / LOCK)


def output_files_are_whole(node: NodeProcess) -> None:
    for path in node.output.glob("*.json"):
        text = path.read_text(encoding="utf-8")
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise AssertionError(f"{path.name} is not valid JSON after the kill ({exc}): {text[-200:]!r}")
        Bundle.model_validate(document)


def delivered(node: NodeProcess, study_uid: str) -> set[str]:
    document = node.output_of(study_uid)
    return instance_uids(document) if document else set()


def fhir_imaging_studies(engine: FhirEngine, study_uid: str) -> list[dict]:
    return [r for r in engine.resources("ImagingStudy")
            if any(i.get("value") == f"urn:oid:{study_uid}" for i in r.get("identifier", []))]


def fhir_instance_uids(resource: dict) -> set[str]:
    return {i["uid"] for s in resource.get("series", []) for i in s.get("instance", [])}


def kill_plan(trial: int) -> dict:
    """Seeded kill moment of one trial: after `after` acknowledgements plus `delay` seconds."""
    rng = random.Random(SEED + trial)
    if trial % 4 == 3:  # in the completion / delivery window, right after the last instance
        return {"phase": "delivering", "after": INSTANCES,
                "delay": rng.uniform(IDLE_TIMEOUT - 0.2, IDLE_TIMEOUT + 0.8)}
    return {"phase": "sending", "after": rng.randrange(0, INSTANCES), "delay": rng.uniform(0.0, 0.05)}


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[GeneratedStudy]:
    root = tmp_path_factory.mktemp("crash-studies")
    return [generate_study(root / f"study{i}", INSTANCES, 2) for i in range(TRIALS)]


@pytest.fixture
def chunked_sending(monkeypatch):
    # The files go out as they are on disk: the sender spends no time re-encoding them.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.mark.parametrize("trial", range(TRIALS), ids=lambda t: f"trial{t}-{'disk+fhir' if t % 2 else 'disk'}")
def test_every_acknowledged_instance_survives_sigkill_at_a_random_moment(
        trial, studies, tmp_path, request, chunked_sending):
    engine = request.getfixturevalue("fhir_engine") if trial % 2 else None
    study = studies[trial]
    plan = kill_plan(trial)
    args = ("--fhir-url", engine.base_url) if engine else ()
    node = NodeProcess(tmp_path / "node", *args, idle_timeout=IDLE_TIMEOUT).start()
    try:
        sender = StreamingSender(node.port, study).start()
        sender.wait_acknowledged(plan["after"])
        time.sleep(plan["delay"])  # the random moment of the kill is under test: real time in the node
        sigkill(node)
        sender.join()
        acknowledged = set(sender.acknowledged)
        assert sender.error is None and not sender.failed, (sender.error, sender.failed)
        assert len(acknowledged) >= plan["after"]
        output_files_are_whole(node)
        in_output_at_kill = len(delivered(node, study.study_uid))

        node.start()
        if acknowledged:
            wait_for(lambda: acknowledged <= delivered(node, study.study_uid), 30, f"the {len(acknowledged)} acknowledged instances in the output; log:\n{node.log()[-2000:]}")
        wait_for(lambda: not [p for p in node.spool.iterdir() if p.is_dir()], 30,
                 f"the spool to empty; it holds {sorted(str(p.relative_to(node.spool)) for p in node.spool.rglob('*'))}")
        output_files_are_whole(node)
        assert temporary_files(node.output) == []
        if engine is not None and acknowledged:
            [resource] = fhir_imaging_studies(engine, study.study_uid)
            ImagingStudy.model_validate(resource)
            assert acknowledged <= fhir_instance_uids(resource)
        print(f"trial {trial}: killed while {plan['phase']} after {len(acknowledged)} acknowledged "
              f"(+{plan['delay']:.3f} s), {in_output_at_kill} already in the output; all {len(acknowledged)} "
              f"delivered after the restart")
    finally:
        if node.process is not None:
            node.stop()


def test_sigterm_mid_stream_exits_0_keeps_every_acknowledged_instance_and_a_restart_delivers_them(
        tmp_path, chunked_sending):
    study = generate_study(tmp_path / "study", INSTANCES, 2)
    node = NodeProcess(tmp_path / "node", idle_timeout=600).start()
    try:
        sender = StreamingSender(node.port, study).start()
        sender.wait_acknowledged(INSTANCES // 2)
        assert node.stop() == 0
        sender.join()
        acknowledged = set(sender.acknowledged)
        assert sender.error is None and not sender.failed, (sender.error, sender.failed)
        assert len(acknowledged) >= INSTANCES // 2
        assert acknowledged <= node.spooled(study.study_uid)
        assert temporary_files(node.spool) == []
        assert "SIGTERM received" in node.log()

        node.start(idle_timeout=IDLE_TIMEOUT)
        node.wait_for_deliveries(study.study_uid)
        assert acknowledged <= instance_uids(node.output_of(study.study_uid))
    finally:
        node.stop()


def test_temporary_files_a_killed_node_left_behind_are_cleared_at_the_next_start(tmp_path, chunked_sending):
    # What a SIGKILL in the middle of writing leaves (names as scp.store.spool and scp.sources.folder make
    # them): half an instance beside the spooled ones, half an output file. Made by hand: the
    # random trials above rarely land inside a write.
    study = generate_study(tmp_path / "study", 3, 1)
    node = NodeProcess(tmp_path / "node", idle_timeout=600).start()
    sender = StreamingSender(node.port, study).start()
    sender.join()
    sigkill(node)
    assert len(sender.acknowledged) == 3
    (node.spool / study.study_uid / ".1.2.826.0.1.3680043.8.498.12345.140245.tmp").write_bytes(b"\x00" * 200)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id no longer in use, as the killed node's
    node.output.mkdir(parents=True, exist_ok=True)
    (node.output / f".{study.study_uid}.json.{gone.pid}.tmp").write_text('{"resourceType": "Bun')

    node.start(idle_timeout=IDLE_TIMEOUT)
    try:
        node.wait_for_deliveries(study.study_uid)
        assert delivered(node, study.study_uid) == set(study.sop_uids)
        wait_for(lambda: not [p for p in node.spool.iterdir() if p.is_dir()], 10,
                 f"the spool to empty; it holds {sorted(str(p.relative_to(node.spool)) for p in node.spool.rglob('*'))}")
        assert temporary_files(node.output) == []
    finally:
        node.stop()


def test_sigkill_during_a_chunked_receive_loses_nothing_acknowledged_and_leaves_no_partial_file(
        tmp_path, chunked_sending):
    # A large data set goes to a temporary file in <spool>/.incoming as it arrives (scp.receive.dataset):
    # killed half-way, the node must not keep any of it, and lose none of what it acknowledged before.
    study = generate_study(tmp_path / "study", 5, 1)
    big = tmp_path / "big.dcm"
    large = large_instance(big, 1 << 30, study_uid=study.study_uid)
    node = NodeProcess(tmp_path / "node", idle_timeout=600).start()
    sender = StreamingSender(node.port, study).start()
    sender.join()
    assert len(sender.acknowledged) == 5, (sender.error, sender.failed)
    incoming = node.spool / ".incoming"
    storescu = storescu_in_background(node.port, big)
    try:
        wait_for_partial_data_set(incoming, 50 << 20)
        sigkill(node)
    finally:
        storescu.wait(30)
    assert large.SOPInstanceUID not in node.spooled(study.study_uid)

    node.start(idle_timeout=IDLE_TIMEOUT)
    try:
        node.wait_for_deliveries(study.study_uid)
        assert delivered(node, study.study_uid) == set(study.sop_uids)
        assert temporary_files(node.spool) == []
    finally:
        node.stop()


def test_a_second_sigterm_exits_at_once_and_keeps_every_acknowledged_instance(tmp_path, chunked_sending):
    # A peer stalled in the middle of an instance keeps the first SIGTERM's stop waiting for its
    # grace (30 s here); the second SIGTERM ends the process at once, the spool as it is.
    import signal
    import socket

    from tests.dicom_wire import associate_rq, command_set, p_data

    study = generate_study(tmp_path / "study", INSTANCES, 2)
    node = NodeProcess(tmp_path / "node", idle_timeout=600, config="[node]\nstop_grace = 30\n").start()
    stalled = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    try:
        stalled.sendall(associate_rq("STALLED", "FHIRSCP"))
        assert stalled.recv(1) == b"\x02"  # A-ASSOCIATE-AC
        stalled.sendall(p_data(1, [(True, True, command_set(0x0001, 1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"))]))
        stalled.sendall(p_data(1, [(False, True, bytes(16384))])[:100])
        sender = StreamingSender(node.port, study).start()
        sender.wait_acknowledged(INSTANCES // 4)
        node.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM received: stopping" in node.log(), 10, "the first SIGTERM's log line")
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        code = node.process.wait(10)
        took = time.monotonic() - started
        node.process = None
        assert code == 128 + signal.SIGTERM
        assert took < 3, f"{took:.1f} s to exit after the second SIGTERM"
        assert "SIGTERM received again: exiting at once" in node.log()
        sender.join()
        acknowledged = set(sender.acknowledged)
        assert len(acknowledged) >= INSTANCES // 4
        assert acknowledged <= node.spooled(study.study_uid)

        node.start(idle_timeout=IDLE_TIMEOUT)
        node.wait_for_deliveries(study.study_uid)
        assert acknowledged <= instance_uids(node.output_of(study.study_uid))
    finally:
        stalled.close()
        node.stop()
