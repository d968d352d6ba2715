"""The C-STORE answer when the spool fails: the in-process StorageServer and StoreHandler
(scp.receive.server) with a real pynetdicom sender over loopback, on port 0.

- The spool cannot be written: 0xA700 (Out of Resources) for that instance, and the
  association goes on.
- The fsync fails: no success for that instance; the association is closed instead,
  so the sender resends it (and the next association stores it).
"""

from __future__ import annotations

import errno
import logging
import os

import pytest

from scp.config import NodeConfig, SecurityConfig
from scp.receive.handlers import StoreHandler
from scp.receive.server import StorageServer
from scp.store.spool import FileSpool
from tests.dicomgen import generate_study
from tests.scu import associate

pytestmark = pytest.mark.usefixtures("strict_pydicom")

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


@pytest.fixture
def server(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    stored: list[tuple[str, str]] = []
    handler = StoreHandler(spool, on_stored=lambda study, sop: stored.append((study, sop)))
    storage = StorageServer(NodeConfig(port=0, bind="127.0.0.1", spool_dir=spool.root), SecurityConfig(), handler)
    storage.start()
    storage.spool, storage.stored = spool, stored
    yield storage
    storage.stop(grace=2)


def status_of(response) -> int | None:
    return getattr(response, "Status", None)


def test_an_instance_the_spool_cannot_write_is_answered_out_of_resources_and_the_association_goes_on(
        server, tmp_path, caplog):
    refused = generate_study(tmp_path / "refused", 1, 1)
    fine = generate_study(tmp_path / "fine", 1, 1)
    # A regular file where the study's spool folder would go: the write fails, root or not.
    (server.spool.root / refused.study_uid).write_bytes(b"not a folder")
    assoc = associate(server.port)
    assert assoc.is_established
    try:
        with caplog.at_level(logging.ERROR, logger="scp.receive.server"):
            assert status_of(assoc.send_c_store(str(refused.files[0]))) == OUT_OF_RESOURCES
        assert assoc.is_established
        assert status_of(assoc.send_c_store(str(fine.files[0]))) == SUCCESS
    finally:
        assoc.release()
    assert server.spool.path(fine.study_uid, fine.sop_uids[0]).is_file()
    assert server.stored == [(fine.study_uid, fine.sop_uids[0])]
    assert refused.sop_uids[0] in caplog.text and "out of resources" in caplog.text


def test_an_instance_whose_fsync_fails_is_not_acknowledged_and_its_association_is_closed(
        server, tmp_path, monkeypatch, caplog):
    study = generate_study(tmp_path / "study", 2, 1)
    doomed = study.sop_uids[0]
    real_fsync = os.fsync
    failed = []

    def fsync(fd: int) -> None:
        # The disk fails this instance's fsync, once; the spool folder's and every other one go through.
        if not failed and os.readlink(f"/proc/self/fd/{fd}").endswith(f"/{doomed}.dcm"):
            failed.append(doomed)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assoc = associate(server.port, timeout=10)
    assert assoc.is_established
    with caplog.at_level(logging.ERROR, logger="scp.receive.server"):
        response = assoc.send_c_store(str(study.files[0]))
        assoc.join(10)  # the sender's association thread ends with the connection
    assert status_of(response) is None  # no status at all: the connection went
    assert assoc.is_aborted and not assoc.is_alive()
    assert failed == [doomed]
    assert any(doomed in r.getMessage() and "fsync failed" in r.getMessage() for r in caplog.records
               if r.levelno == logging.ERROR)

    again = associate(server.port)  # the sender resends what was not acknowledged
    assert again.is_established
    try:
        assert [status_of(again.send_c_store(str(path))) for path in study.files] == [SUCCESS, SUCCESS]
    finally:
        again.release()
    assert {p.stem for p in (server.spool.root / study.study_uid).glob("*.dcm")} == set(study.sop_uids)
