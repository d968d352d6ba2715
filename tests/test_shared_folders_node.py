"""Shared folders and folders as operators make them, with real node processes (tests/scp_node.py).

- Two nodes writing one output folder, one study split across them (2 x 500 instances):
  one JSON with all 1000 instances.
- Two nodes on one spool: the second refuses at start, naming the first one's PID.
- A spool holding lost+found (root-owned, mode 700) starts, delivers, and leaves it alone.
- An unreadable spool entry (a folder, a FIFO named like an instance) is quarantined with
  its reason; the rest of its study is delivered; `status` shows it.
- Unwritable folders at start: exit 2, one line, no "ready".
- A UID ending in a newline is refused; a refused first instance leaves no study folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tool
from tests.dicomgen import generate_study
from tests.scp_node import LISTENING, NodeProcess, instance_uids
from tests.scu import associate

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


@pytest.fixture
def nodes():
    """NodeProcess objects to stop at the end (each test builds and starts its own)."""
    started: list[NodeProcess] = []
    yield started
    for process in started:
        process.stop()


def storescu(port: int, folder: Path, calling: str) -> subprocess.Popen:
    tool = require_tool("storescu")
    env = dict(os.environ, TCP_NODELAY="1")  # the sender's Nagle stall (/work/shared/peers.md) is not under test
    return subprocess.Popen([tool, "-aet", calling, "-aec", "FHIRSCP", "+sd", "127.0.0.1", str(port), str(folder)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scp", "serve", "--port", "0", "--bind", "127.0.0.1", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


# --- shared folders -----------------------------------------------------------------------------


def test_two_nodes_on_one_output_folder_keep_every_instance_of_a_study_split_across_them(tmp_path, nodes):
    shared = tmp_path / "shared-output"
    first = generate_study(tmp_path / "part1", 500, 2)
    second = generate_study(tmp_path / "part2", 500, study_uid=first.study_uid, series_uids=first.series_uids)
    for name in ("a", "b"):
        node = NodeProcess(tmp_path / name, idle_timeout=0.5)
        node.output = shared
        nodes.append(node.start())
    senders = [storescu(nodes[0].port, first.files[0].parent, "SENDERA"),
               storescu(nodes[1].port, second.files[0].parent, "SENDERB")]
    for sender in senders:
        out, _ = sender.communicate(timeout=300)
        assert sender.returncode == 0, out
    for node in nodes:
        node.wait_for_deliveries_total(500, 1, timeout=120)
    document = json.loads((shared / f"{first.study_uid}.json").read_text())
    assert instance_uids(document) == set(first.sop_uids) | set(second.sop_uids)
    assert sorted(p.name for p in shared.iterdir()) == [f"{first.study_uid}.json"]  # no lock or temp file left


def test_a_second_node_on_the_same_spool_refuses_naming_the_first_ones_pid(tmp_path, nodes):
    owner = NodeProcess(tmp_path / "a")
    nodes.append(owner.start())
    result = serve("--spool-dir", str(owner.spool), "--output-dir", str(tmp_path / "b" / "out"),
                   "--dead-letter-dir", str(tmp_path / "b" / "dead-letter"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"in use by another node (PID {owner.process.pid})" in lines[0]
    assert "Traceback" not in result.stderr and " ready on " not in result.stderr
    assert owner.process.poll() is None  # the owner is untouched


def test_retry_requeue_refuses_on_the_spool_of_a_running_node_and_leaves_the_study_set_aside(tmp_path, nodes):
    owner = NodeProcess(tmp_path / "a")
    nodes.append(owner.start())
    study = "1.2.3.4.5"
    (owner.dead_letter / study / "instances").mkdir(parents=True)
    (owner.dead_letter / study / "reason.txt").write_text("refused by the test\n")
    result = subprocess.run([sys.executable, "-m", "scp", "retry", "--requeue", "--all", "--spool-dir",
                             str(owner.spool), "--dead-letter-dir", str(owner.dead_letter)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"(PID {owner.process.pid})" in lines[0] and "stop the node first" in lines[0], \
        result.stderr
    assert (owner.dead_letter / study / "reason.txt").exists()


# --- folders as operators make them ----------------------------------------------------------------


def test_a_spool_with_lost_and_found_starts_delivers_and_leaves_it_alone(tmp_path, nodes):
    node = NodeProcess(tmp_path / "n", idle_timeout=0.5)
    found = node.spool / "lost+found"
    found.mkdir(parents=True)
    os.chmod(found, 0o700)
    nodes.append(node.start())
    study = generate_study(tmp_path / "study", 3, 1)
    assoc = associate(node.port)
    try:
        assert [assoc.send_c_store(str(p)).Status for p in study.files] == [SUCCESS] * 3
    finally:
        assoc.release()
    node.wait_for_deliveries(study.study_uid)
    assert node.stop() == 0
    assert found.is_dir() and (found.stat().st_mode & 0o777) == 0o700 and found.stat().st_uid == 0
    nodes.append(node.start())  # and again at the next start
    assert found.is_dir()


def test_a_spool_that_is_a_mount_point_starts(tmp_path):
    unshare = require_tool("unshare")
    spool = tmp_path / "spool"
    spool.mkdir()
    # A private mount namespace: a fresh file system on the spool, as an operator mounts one.
    script = (f"mount -t tmpfs -o size=16m tmpfs {spool} && mkdir -m 700 {spool}/lost+found && "
              f"exec {sys.executable} -m scp serve --port 0 --bind 127.0.0.1 --spool-dir {spool} "
              f"--output-dir {tmp_path / 'out'} --dead-letter-dir {tmp_path / 'dl'}")
    process = subprocess.Popen([unshare, "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if " ready on " in line or "ERROR" in line:
                break
        assert " ready on " in lines[-1], "".join(lines)
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_an_unreadable_spool_entry_is_quarantined_and_the_rest_of_its_study_delivered(tmp_path, nodes):
    node = NodeProcess(tmp_path / "n", idle_timeout=30)
    nodes.append(node.start())
    study = generate_study(tmp_path / "study", 4, 1)
    assoc = associate(node.port)
    try:
        assert [assoc.send_c_store(str(p)).Status for p in study.files] == [SUCCESS] * 4
    finally:
        assoc.release()
    assert node.stop() == 0  # before its idle timeout: the study waits in the spool
    nodes.clear()
    folder = node.spool / study.study_uid
    (folder / "1.2.3.999.1.dcm").mkdir()  # a folder named like an instance
    os.mkfifo(folder / "1.2.3.999.2.dcm")  # opening it for reading would wait for ever
    nodes.append(node.start(idle_timeout=0.5))
    (delivered,) = node.wait_for_deliveries(study.study_uid)
    assert delivered["instances"] == 4
    assert instance_uids(node.output_of(study.study_uid)) == set(study.sop_uids)
    assert not folder.exists()
    quarantine = node.spool / "quarantine" / study.study_uid
    assert sorted(p.name for p in quarantine.iterdir()) == ["1.2.3.999.1.dcm", "1.2.3.999.1.dcm.reason.txt",
                                                            "1.2.3.999.2.dcm", "1.2.3.999.2.dcm.reason.txt"]
    assert "not a regular file (a folder)" in (quarantine / "1.2.3.999.1.dcm.reason.txt").read_text()
    log = node.log()
    assert "Traceback" not in log
    assert log.count("1.2.3.999.1.dcm cannot be read") == 1
    status = subprocess.run([sys.executable, "-m", "scp", "status", "--spool-dir", str(node.spool),
                             "--dead-letter-dir", str(node.dead_letter), "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    report = json.loads(status.stdout)
    assert {q["entry"] for q in report["quarantined"]} == {"1.2.3.999.1.dcm", "1.2.3.999.2.dcm"}
    assert report["waiting"] == []


@pytest.mark.parametrize("flag", ["--spool-dir", "--output-dir", "--dead-letter-dir", "--archive-dir"])
def test_an_unwritable_folder_at_start_is_one_line_exit_2_and_no_ready(tmp_path, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # root ignores mode bits; a path under a regular file is unwritable for anyone
    folders = {"--spool-dir": tmp_path / "spool", "--output-dir": tmp_path / "out",
               "--dead-letter-dir": tmp_path / "dl", flag: blocker / "folder"}
    result = serve(*(str(x) for pair in folders.items() for x in pair))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a folder" in lines[0] and flag in lines[0], result.stderr
    assert "Traceback" not in result.stderr and " ready on " not in result.stderr


def test_a_read_only_spool_at_start_is_one_line_exit_2_and_no_ready(tmp_path):
    unshare = require_tool("unshare")
    spool = tmp_path / "spool"
    spool.mkdir()
    script = (f"mount -t tmpfs -o ro,size=1m tmpfs {spool} && exec {sys.executable} -m scp serve --port 0 "
              f"--bind 127.0.0.1 --spool-dir {spool} --output-dir {tmp_path / 'out'} "
              f"--dead-letter-dir {tmp_path / 'dl'}")
    result = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "read-only file system" in lines[0], result.stderr
    assert " ready on " not in result.stderr


# --- UIDs ---------------------------------------------------------------------------------------------


def test_a_study_uid_ending_in_a_newline_is_refused_and_leaves_no_folder(tmp_path, nodes):
    node = NodeProcess(tmp_path / "n")
    nodes.append(node.start())
    study = generate_study(tmp_path / "one", 1, 1, study_uid="1.2.3.44")
    # What a broken sender sends (pydicom strips it, so the bytes are patched): same length, no padding.
    path = study.files[0]
    path.write_bytes(path.read_bytes().replace(b"1.2.3.44", b"1.2.3.4\n"))
    assoc = associate(node.port)
    try:
        status = assoc.send_c_store(str(path)).Status  # a path: pynetdicom sends the file's bytes as they are
    finally:
        assoc.release()
    assert status == 0xA900  # Data Set does not match SOP Class (not a valid UID)
    assert "'1.2.3.4\\n' is not a valid UID" in node.log()
    assert [p.name for p in node.spool.iterdir() if not p.name.startswith(".")] == []


def test_out_of_space_is_out_of_resources_leaves_no_study_folder_and_the_node_goes_on(tmp_path):
    unshare = require_tool("unshare")
    spool = tmp_path / "spool"
    spool.mkdir()
    # The spool on a small file system of its own (a private mount namespace), filled up once the node runs.
    script = (f"mount -t tmpfs -o size=1m tmpfs {spool} && exec {sys.executable} -m scp serve --port 0 "
              f"--bind 127.0.0.1 --spool-dir {spool} --output-dir {tmp_path / 'out'} "
              f"--dead-letter-dir {tmp_path / 'dl'} --idle-timeout 60")
    process = subprocess.Popen([unshare, "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in process.stderr:
            found = LISTENING.search(line)
            port = int(found[2]) if found else port
            if " ready on " in line or "ERROR" in line:
                break
        assert port is not None and " ready on " in line, line
        seen = Path(f"/proc/{process.pid}/root") / str(spool).lstrip("/")  # the spool as the node sees it
        with open(seen / ".filler", "wb", buffering=0) as filler:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * 4096)
        full, later = generate_study(tmp_path / "full", 1, 1), generate_study(tmp_path / "later", 1, 1)
        assoc = associate(port)
        try:
            assert assoc.send_c_store(str(full.files[0])).Status == OUT_OF_RESOURCES
            assert not (seen / full.study_uid).exists()  # the refused first instance left no folder
            (seen / ".filler").unlink()
            assert assoc.send_c_store(str(later.files[0])).Status == SUCCESS  # and the node went on
        finally:
            assoc.release()
        assert (seen / later.study_uid).is_dir()
    finally:
        process.terminate()
        process.communicate(timeout=30)
