"""Folders as operators make them, and folders shared between processes (scp.store).

- Entries the node did not create (lost+found, dotfiles, folders not named like a UID)
  are never read nor removed; an unreadable study folder is reported once.
- A spool entry that cannot be read is quarantined with its reason; the rest of the
  study is read, and `status` lists it.
- The spool's lock: a second holder is refused, naming the first one's PID.
- The disk output is merged under a per-file lock: a writer waiting for it sees what
  the holder wrote, and a temp file is an orphan only when its file's lock is free.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pydicom
import pytest

from mapping import convert_datasets
from pydicom.data import get_testdata_file
from scp.ops.status import build_report, format_report
from scp.sinks.disk import remove_orphaned_temp_files, write_study
from scp.store.dead_letter import DeadLetterBox
from scp.store.files import locked
from scp.store.layout import QUARANTINE, output_file, output_lock_file, temp_file
from scp.store.spool import FileSpool, SpoolBusyError, SpoolLock, list_quarantined
from tests.clocks import wait_for
from tests.scp_node import instance_uids

# One test starts a child process (a PID that is not running any more).
pytestmark = pytest.mark.interop

STUDY = "1.2.3.4"


def lost_and_found(root):
    """What mkfs.ext4 leaves at the top of every file system: root-owned, mode 700."""
    folder = root / "lost+found"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o700)
    return folder


# --- entries the node did not make ------------------------------------------------------------


def test_lost_and_found_in_the_spool_is_neither_a_study_nor_removed(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    found = lost_and_found(spool.root)
    spool.store(STUDY, "1.2.3.4.1", [b"abc"])
    assert spool.recover() == 0
    assert spool.studies() == {STUDY: {"1.2.3.4.1"}}
    assert spool.depth() == 1
    assert found.is_dir() and oct(found.stat().st_mode & 0o777) == "0o700"


def test_dotfiles_and_folders_not_named_like_a_uid_are_left_alone(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    for name in (".snapshot", "notes", "1.2.3\n", "1..2"):
        (spool.root / name).mkdir()
    (spool.root / "README").write_text("an operator's note")
    spool.recover()
    assert spool.studies() == {}
    assert spool.depth() == 0
    assert sorted(p.name for p in spool.root.iterdir()) == sorted([".snapshot", "notes", "1.2.3\n", "1..2", "README"])


def test_an_empty_study_folder_is_still_dropped_at_start(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    (spool.root / STUDY).mkdir()
    spool.recover()
    assert not (spool.root / STUDY).exists()


def test_an_unreadable_study_folder_is_reported_once_not_at_every_scan(tmp_path, monkeypatch, caplog):
    spool = FileSpool(tmp_path / "spool")
    spool.store(STUDY, "1.2.3.4.1", [b"abc"])
    real_listdir = os.listdir

    def listdir(path):  # root reads any folder: the refusal a non-root node would get
        if str(path).endswith(STUDY):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with caplog.at_level(logging.ERROR, logger="scp.store.spool"):
        for _ in range(3):
            assert spool.studies() == {}
    assert [r.getMessage() for r in caplog.records].count(
        f"spool folder {spool.root / STUDY} cannot be read (Permission denied (EACCES)); "
        "its study waits until it can") == 1


def test_the_dead_letter_folder_ignores_lost_and_found(tmp_path):
    box = DeadLetterBox(tmp_path / "dead-letter")
    lost_and_found(box.root)
    assert box.list() == [] and box.count() == 0


# --- unreadable spool entries ---------------------------------------------------------------------


@pytest.mark.parametrize("make", ["folder", "fifo", "dangling link"])
def test_an_unreadable_spool_entry_is_quarantined_with_its_reason_and_the_rest_is_read(tmp_path, make, caplog):
    spool = FileSpool(tmp_path / "spool")
    spool.store(STUDY, "1.2.3.4.1", [b"first"])
    spool.store(STUDY, "1.2.3.4.3", [b"third"])
    entry = spool.path(STUDY, "1.2.3.4.2")
    if make == "folder":
        entry.mkdir()
    elif make == "fifo":
        os.mkfifo(entry)  # opening it for reading would block for ever
    else:
        entry.symlink_to(tmp_path / "nowhere")
    with caplog.at_level(logging.ERROR, logger="scp.store.spool"):
        read = list(spool.read(STUDY, sorted(spool.studies()[STUDY])))
    assert [i.data for i in read] == [b"first", b"third"]
    assert not os.path.lexists(entry)
    (quarantined,) = list_quarantined(spool.root)
    assert (quarantined.study_uid, quarantined.name) == (STUDY, "1.2.3.4.2.dcm")
    assert quarantined.reason.startswith("cannot be read: ")
    assert os.path.lexists(spool.root / QUARANTINE / STUDY / "1.2.3.4.2.dcm")
    assert spool.studies() == {STUDY: {"1.2.3.4.1", "1.2.3.4.3"}}
    assert [r.levelname for r in caplog.records] == ["ERROR"] and not caplog.records[0].exc_info


def test_a_study_whose_only_entry_is_quarantined_leaves_no_folder(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    (spool.root / STUDY / "1.2.3.4.2.dcm").mkdir(parents=True)
    assert list(spool.read(STUDY, ["1.2.3.4.2"])) == []
    assert not (spool.root / STUDY).exists()
    assert spool.depth() == 0 and spool.studies() == {}


def test_the_quarantine_folder_is_no_study(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    (spool.root / STUDY / "1.2.3.4.2.dcm").mkdir(parents=True)
    list(spool.read(STUDY, ["1.2.3.4.2"]))
    spool.recover()
    assert spool.studies() == {} and spool.depth() == 0
    assert (spool.root / QUARANTINE / STUDY / "1.2.3.4.2.dcm").is_dir()


def test_status_lists_quarantined_entries_with_their_reason(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    (spool.root / STUDY / "1.2.3.4.2.dcm").mkdir(parents=True)
    list(spool.read(STUDY, ["1.2.3.4.2"]))
    report = build_report(spool.root, tmp_path / "dead-letter", now=0)
    assert [(q.study, q.entry) for q in report.quarantined] == [(STUDY, "1.2.3.4.2.dcm")]
    assert "not a regular file (a folder)" in report.quarantined[0].reason
    assert report.waiting == ()
    text = "\n".join(format_report(report))
    assert "Quarantined spool entries" in text and "not a regular file (a folder)" in text
    assert report.to_json()["quarantined"][0]["study"] == STUDY


def test_a_file_that_cannot_be_parsed_is_quarantined_too(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    spool.store(STUDY, "1.2.3.4.1", [b"garbled"])
    (garbled,) = spool.read(STUDY, ["1.2.3.4.1"])
    spool.mark_corrupt(STUDY, "1.2.3.4.1", garbled.version)
    assert [q.name for q in list_quarantined(spool.root)] == ["1.2.3.4.1.dcm"]
    assert not (spool.root / STUDY).exists()


# --- the spool's lock -----------------------------------------------------------------------------


def test_a_second_holder_of_the_spool_lock_is_refused_naming_the_first_ones_pid(tmp_path):
    with SpoolLock.acquire(tmp_path):
        with pytest.raises(SpoolBusyError, match=rf"in use by another node \(PID {os.getpid()}\)") as refused:
            SpoolLock.acquire(tmp_path)
        assert refused.value.pid == os.getpid()
    SpoolLock.acquire(tmp_path).release()  # released: the next one gets it


def test_the_spool_lock_file_is_hidden_from_every_reader(tmp_path):
    spool = FileSpool(tmp_path)
    with SpoolLock.acquire(tmp_path):
        assert spool.studies() == {} and spool.depth() == 0 and spool.recover() == 0


# --- the output file's lock -----------------------------------------------------------------------


def study_part(sop_uid: str):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = STUDY
    ds.SOPInstanceUID = sop_uid
    return convert_datasets([ds])[STUDY]


def waiting_on(lock_path) -> bool:
    """A process or thread is blocked on the flock of this file (/proc/locks shows waiters as '->')."""
    inode = f":{os.stat(lock_path).st_ino} "
    with open("/proc/locks") as f:
        return any("->" in line and "FLOCK" in line and inode in line for line in f)


def test_a_writer_merges_what_the_lock_holder_wrote_while_it_waited(tmp_path):
    write_study(study_part("1.2.3.4.1"), tmp_path)
    path = tmp_path / output_file(STUDY)
    second = threading.Thread(target=write_study, args=(study_part("1.2.3.4.3"), tmp_path))
    with locked(path):  # another node in the middle of its merge
        second.start()
        wait_for(lambda: waiting_on(tmp_path / output_lock_file(path.name)), 10, "the second writer to wait")
        _merge_unlocked(study_part("1.2.3.4.2"), path)
    second.join(30)
    assert instance_uids(json.loads(path.read_text())) == {"1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no lock file left


def _merge_unlocked(resources, path):
    """What the lock holder does: read, merge, write (it holds the lock already)."""
    from mapping import merge_resources, parse_resources, render
    from scp.store.files import write_atomically

    merged = merge_resources(parse_resources(json.loads(path.read_text())), resources)
    write_atomically(path, json.dumps(render(merged, "bundle")).encode())


def dead_pid() -> int:
    """The PID of a process that has ended (reaped: no process has it until it is reused)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_orphaned_output_temp_file_is_removed_only_once_its_files_lock_is_free(tmp_path):
    path = tmp_path / output_file(STUDY)
    # Written by a PID not running here: a node on another host of a shared folder, or one that died.
    orphan = tmp_path / temp_file(path.name, dead_pid())
    orphan.write_text('{"resourceType": "Bun')
    done = []
    with locked(path):  # its writer (on another host) is still at it
        cleaner = threading.Thread(target=lambda: done.append(remove_orphaned_temp_files(tmp_path)))
        cleaner.start()
        wait_for(lambda: waiting_on(tmp_path / output_lock_file(path.name)), 10, "the clean-up to wait for the lock")
        assert orphan.exists()
        orphan.rename(path)  # the writer's rename: no orphan after all
    cleaner.join(30)
    assert done == [0] and path.exists()
    orphan.write_text('{"resourceType": "Bun')
    assert remove_orphaned_temp_files(tmp_path) == 1 and not orphan.exists()
