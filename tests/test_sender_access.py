"""Who may connect, by the [[senders]] table: the in-process StorageServer (port 0) and a
pynetdicom sender over loopback, from two peer addresses (127.0.0.1 and 127.0.0.2, both
this machine's on Linux; pynetdicom's bind_address picks the sender's).

- An AE title paired with addresses in [[senders]] is refused from any other address
  (A-ASSOCIATE-RJ 1/1/3 and a log line naming the pairing) and stores from its own.
- With security.allow_unknown_senders = false an AE title without an entry is refused,
  one with an entry stores.
- Without [[senders]] any AE title from any address stores, as before the table existed.
- The node as run (tests/scp_node.py) takes [[senders]] from its file to the association.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from scp.config import Config, NodeConfig, config_from_mapping
from scp.receive.handlers import StoreHandler
from scp.receive.server import StorageServer
from scp.receive.status import REJECT_CALLING_AE
from scp.senders import SenderTable
from scp.store.spool import FileSpool
from tests.dicomgen import generate_study
from tests.scp_node import NodeProcess, instance_uids
from tests.scu import keep_responses

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

PAIRED, OTHER = "127.0.0.1", "127.0.0.2"  # the sender's own address, and one it is not paired with
SUCCESS = 0x0000


def node_config(**raw: Any) -> Config:
    return config_from_mapping(raw, environ={})


@pytest.fixture
def serve(tmp_path):
    """serve(config) -> a started StorageServer built from config, as scp.node builds it."""
    started: list[StorageServer] = []

    def start(config: Config) -> StorageServer:
        spool = FileSpool(tmp_path / f"spool{len(started)}")
        stored: list[tuple[str, str]] = []
        handler = StoreHandler(spool, on_stored=lambda study, sop: stored.append((study, sop)))
        node = NodeConfig(port=0, bind="127.0.0.1", spool_dir=spool.root)
        server = StorageServer(node, config.security, handler, SenderTable.from_config(config))
        server.start()
        server.stored = stored
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=2)


class Attempt:
    """One association from `address` as `calling`: accepted (and a study stored) or the A-ASSOCIATE-RJ."""

    def __init__(self, port: int, calling: str, address: str) -> None:
        self.rejection: tuple[int, int, int] | None = None
        ae = AE(ae_title=calling)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
        self.assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="FHIRSCP", bind_address=(address, 0),
                                                 evt_handlers=[(evt.EVT_ACSE_RECV, self._received)]))

    def _received(self, event) -> None:
        primitive = event.primitive
        if getattr(primitive, "result", None) in (0x01, 0x02):
            self.rejection = (primitive.result, primitive.result_source, primitive.diagnostic)

    def store(self, files) -> list[int]:
        try:
            return [self.assoc.send_c_store(str(path)).Status for path in files]
        finally:
            self.assoc.release()


def stores(server: StorageServer, tmp_path, calling: str, address: str) -> bool:
    """Whether calling, from address, gets a two-instance study acknowledged and into the spool."""
    study = generate_study(tmp_path / f"{calling}-{address}", 2, 1)
    attempt = Attempt(server.port, calling, address)
    if not attempt.assoc.is_established:
        return False
    assert attempt.store(study.files) == [SUCCESS, SUCCESS]
    return {sop for study_uid, sop in server.stored if study_uid == study.study_uid} == set(study.sop_uids)


def refused(server: StorageServer, calling: str, address: str, caplog) -> tuple[tuple[int, int, int] | None, str]:
    """(A-ASSOCIATE-RJ result/source/diagnostic, the node's log line) for a refused association."""
    with caplog.at_level(logging.WARNING, logger="scp.receive.server"):
        attempt = Attempt(server.port, calling, address)
    assert attempt.assoc.is_rejected, "association not rejected"
    lines = [r.getMessage() for r in caplog.records
             if r.name == "scp.receive.server" and f"association from {calling} at {address}" in r.getMessage()]
    assert len(lines) == 1, lines
    return attempt.rejection, lines[0]


PAIRED_SENDER = node_config(senders=[{"ae_title": "CT_A", "addresses": [PAIRED]}])


def test_an_ae_title_from_an_address_it_is_not_paired_with_is_refused_as_not_recognized(serve, caplog):
    server = serve(PAIRED_SENDER)
    rejection, line = refused(server, "CT_A", OTHER, caplog)
    assert rejection == REJECT_CALLING_AE == (1, 1, 3)
    assert line == (f"association from CT_A at {OTHER} (called FHIRSCP) rejected: calling AE title 'CT_A' "
                    f"is paired with {PAIRED} in [[senders]], not with {OTHER}")


def test_the_same_ae_title_from_its_paired_address_stores(serve, tmp_path):
    assert stores(serve(PAIRED_SENDER), tmp_path, "CT_A", PAIRED)


def test_an_ae_title_paired_with_a_network_stores_from_any_address_in_it(serve, tmp_path):
    server = serve(node_config(senders=[{"ae_title": "CT_A", "addresses": ["127.0.0.0/30"]}]))
    assert stores(server, tmp_path, "CT_A", OTHER)


CLOSED = node_config(security={"allow_unknown_senders": False}, senders=[{"ae_title": "CT_B"}])


def test_with_unknown_senders_off_an_ae_title_without_an_entry_is_refused(serve, caplog):
    rejection, line = refused(serve(CLOSED), "STRANGER", PAIRED, caplog)
    assert rejection == (1, 1, 3)
    assert line.endswith("rejected: calling AE title 'STRANGER' has no [[senders]] entry "
                         "(security.allow_unknown_senders = false)")


def test_with_unknown_senders_off_an_ae_title_with_an_entry_stores(serve, tmp_path):
    assert stores(serve(CLOSED), tmp_path, "CT_B", OTHER)


def test_with_unknown_senders_on_an_ae_title_without_an_entry_stores_beside_paired_ones(serve, tmp_path):
    assert stores(serve(PAIRED_SENDER), tmp_path, "STRANGER", OTHER)


@pytest.mark.parametrize("address", [PAIRED, OTHER])
def test_without_senders_any_ae_title_from_any_address_stores(serve, tmp_path, address):
    assert stores(serve(Config()), tmp_path, "ANYONE", address)


# --- the node as run (python -m scp serve): [[senders]] from the file reach the association ------


def test_the_node_refuses_an_unpaired_address_from_its_config_file_and_stores_from_the_paired_one(tmp_path):
    node = NodeProcess(tmp_path / "node", config=f'[[senders]]\nae_title = "CT_A"\naddresses = ["{OTHER}"]\n').start()
    try:
        attempt = Attempt(node.port, "CT_A", PAIRED)
        assert attempt.assoc.is_rejected and attempt.rejection == (1, 1, 3)
        study = generate_study(tmp_path / "study", 2, 1)
        assert Attempt(node.port, "CT_A", OTHER).store(study.files) == [SUCCESS, SUCCESS]
        node.wait_for_deliveries(study.study_uid)
        assert instance_uids(node.output_of(study.study_uid)) == set(study.sop_uids)
    finally:
        node.stop()
    assert (f"association from CT_A at {PAIRED} (called FHIRSCP) rejected: calling AE title 'CT_A' is paired "
            f"with {OTHER} in [[senders]], not with {PAIRED}") in node.log()
