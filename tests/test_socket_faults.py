"""Bad input over the socket: the node never goes down, leaks nothing, and says what happened.

Each fault is sent by hand (tests/dicom_wire.py) to the node started as a subprocess
(tests/scp_node.py). After it the node must still answer C-ECHO and store and deliver a
good study, its spool must hold nothing of the aborted instance (no temporary file, no
study folder), and its log must carry a warning (or error) line about the connection.

Data sets that arrive whole but are unusable get a DIMSE failure status and the
association goes on (test_scp_node.py covers a missing StudyInstanceUID and a truncated
file sent by pynetdicom; the other required UIDs, unsafe UIDs and bytes that are no data
set are here).
"""

from __future__ import annotations

import random
import re
import struct
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from scp.store.layout import LOCK
from tests.clocks import wait_for
from tests.dicom_wire import WireClient, associate_rq, command_set, p_data
from tests.dicomgen import generate_study, template_dataset
from tests.scp_node import NodeProcess, instance_uids

pytestmark = pytest.mark.interop

SEED = 4242
WARNING_LINE = re.compile(r" (WARNING|ERROR) ")


def encode(ds: pydicom.Dataset) -> bytes:
    """A data set in Explicit VR Little Endian, without file meta: what goes into P-DATA."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def good_dataset() -> pydicom.Dataset:
    ds = template_dataset()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    return ds


def rss_peak_mb(node: NodeProcess) -> float:
    status = Path(f"/proc/{node.process.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


def spool_leftovers(node: NodeProcess) -> list[str]:
    """Everything in the spool but the delivery journal and the running node's lock file."""
    return sorted(str(p.relative_to(node.spool)) for p in node.spool.rglob("*")
                  if p.name not in ("deliveries.jsonl", LOCK))


def new_warnings(node: NodeProcess, offset: int) -> list[str]:
    return [line for line in node.log()[offset:].splitlines() if WARNING_LINE.search(line)]


@pytest.fixture
def node(tmp_path):
    process = NodeProcess(tmp_path / "node", idle_timeout=1.0).start()
    yield process
    process.stop()


def assert_still_serving(node: NodeProcess, tmp_path: Path, log_offset: int, warning: str = "") -> None:
    """Alive, answers C-ECHO, stores and delivers a good study; spool clean; a warning (matching
    the regular expression `warning`) was logged."""
    assert node.process.poll() is None, f"the node died:\n{node.log()[-3000:]}"
    wait_for(lambda: any(re.search(warning, line) for line in new_warnings(node, log_offset)), 10,
             f"a warning about the fault matching {warning!r}; log:\n{node.log()[-2000:]}")
    assert spool_leftovers(node) == []  # nothing of the aborted instance
    client = WireClient.connect(node.port)
    assert client.associate(calling="ECHOSCU", abstract_syntax="1.2.840.10008.1.1") == "accepted"
    assert client.c_echo() == 0x0000
    client.release()
    study = generate_study(tmp_path / "good", 3, 1)
    client = WireClient.connect(node.port)
    assert client.associate(calling="GOODSCU") == "accepted"
    for path, sop_uid in zip(study.files, study.sop_uids):
        assert client.c_store(encode(pydicom.dcmread(path)), sop_uid=sop_uid) == 0x0000
    client.release()
    node.wait_for_deliveries(study.study_uid)
    assert instance_uids(node.output_of(study.study_uid)) == set(study.sop_uids)
    wait_for(lambda: spool_leftovers(node) == [], 10, "the spool to empty")


def fault_offset(node: NodeProcess) -> int:
    return len(node.log())


# --- faults at the connection level ---------------------------------------------------------------


def test_garbage_bytes_instead_of_a_pdu_are_dropped_and_the_node_keeps_serving(node, tmp_path):
    offset = fault_offset(node)
    client = WireClient.connect(node.port, timeout=10)
    client.send(b"GET / HTTP/1.1\r\nHost: fhirscp\r\n\r\n" + random.Random(SEED).randbytes(4000))
    assert client.answer() in ("A-ABORT", "closed")
    client.close()
    assert_still_serving(node, tmp_path, offset, "Unknown PDU type")


def test_a_truncated_association_request_then_disconnect_leaves_the_node_serving(node, tmp_path):
    offset = fault_offset(node)
    request = associate_rq("TRUNCSCU", "FHIRSCP")
    client = WireClient.connect(node.port)
    client.send(request[:len(request) // 2])
    client.close()
    assert_still_serving(node, tmp_path, offset, "closed without an association")


def test_an_association_request_then_disconnect_leaves_the_node_serving(node, tmp_path):
    offset = fault_offset(node)
    client = WireClient.connect(node.port)
    client.send(associate_rq("GONESCU", "FHIRSCP"))
    client.close()
    # Depending on timing the node accepted before it saw the connection go, or not.
    assert_still_serving(node, tmp_path, offset, "closed without an association|association from GONESCU .* closed")


def test_a_disconnect_in_the_middle_of_a_data_set_spools_nothing_of_it(node, tmp_path):
    ds = good_dataset()
    data = encode(ds)
    offset = fault_offset(node)
    client = WireClient.connect(node.port)
    assert client.associate(calling="HALFSCU") == "accepted"
    client.send(p_data(1, [(True, True, command_set(0x0001, 1, ds.SOPClassUID, ds.SOPInstanceUID))]))
    client.send(p_data(1, [(False, False, data[:len(data) // 2])]))  # more fragments announced, never sent
    time.sleep(0.2)  # real time for the node to take in the first half before the connection drops
    client.close()
    assert_still_serving(node, tmp_path, offset, f"HALFSCU .* ended in the middle of instance {ds.SOPInstanceUID}")
    assert not (node.spool / ds.StudyInstanceUID).exists()
    assert node.output_of(ds.StudyInstanceUID) is None


def test_a_disconnect_in_the_middle_of_a_pdu_spools_nothing_of_it(node, tmp_path):
    ds = good_dataset()
    offset = fault_offset(node)
    client = WireClient.connect(node.port)
    assert client.associate(calling="CUTSCU") == "accepted"
    client.send(p_data(1, [(True, True, command_set(0x0001, 1, ds.SOPClassUID, ds.SOPInstanceUID))]))
    pdu = p_data(1, [(False, True, encode(ds))])
    client.send(pdu[:len(pdu) - 1000])  # the PDU's last 1000 bytes never come
    time.sleep(0.2)  # real time for the node to take in the partial PDU before the connection drops
    client.close()
    assert_still_serving(node, tmp_path, offset, f"CUTSCU .* ended in the middle of instance {ds.SOPInstanceUID}")
    assert not (node.spool / ds.StudyInstanceUID).exists()


@pytest.mark.parametrize("when", ["before the association", "during the association"])
def test_an_oversized_pdu_length_costs_no_memory_and_leaves_the_node_serving(node, tmp_path, when):
    # A PDU announcing 1 GiB of which a few bytes come: the node must not set aside memory for
    # what a peer merely announces (16 such connections would otherwise take 16 GiB).
    before = rss_peak_mb(node)
    offset = fault_offset(node)
    client = WireClient.connect(node.port)
    if when == "during the association":
        assert client.associate(calling="HUGESCU") == "accepted"
        header = struct.pack(">BBL", 0x04, 0, 1 << 30)
    else:
        header = struct.pack(">BBL", 0x01, 0, 1 << 30)
    client.send(header + bytes(1000))
    time.sleep(0.5)  # real time for the node to read the header (and set memory aside, if it trusted it)
    client.close()
    # once associated, a P-DATA over node.max_pdu is refused at its header
    assert_still_serving(node, tmp_path, offset, "shorter than expected" if when == "before the association"
                         else r"longer than the \d+ the node accepts")
    assert rss_peak_mb(node) - before < 100


def test_a_p_data_pdu_longer_than_the_node_accepts_ends_the_association_before_its_body_is_read(node, tmp_path):
    # The node advertises node.max_pdu (1 MiB); a sender ignoring it would otherwise make the node
    # hold the whole PDU - up to 4 GiB - in memory before any of it reaches the disk.
    offset = fault_offset(node)
    client = WireClient.connect(node.port, timeout=10)
    assert client.associate(calling="HUGESCU") == "accepted"
    client.send(struct.pack(">BBL", 0x04, 0, 256 << 20) + bytes(1000))
    try:
        first = client.sock.recv(1)  # at once: nothing more of the 256 MiB is waited for
    except ConnectionResetError:
        first = b""
    except TimeoutError:
        pytest.fail("the node waited for the body of a P-DATA PDU longer than it accepts")
    client.close()
    assert first in (b"", b"\x07")  # closed, or A-ABORT
    assert_still_serving(node, tmp_path, offset, r"P-DATA PDU of 268435456 bytes, longer than the \d+ the node accepts")


# --- data sets that arrive whole but cannot be used -------------------------------------------------


def without(name: str) -> bytes:
    ds = good_dataset()
    delattr(ds, name)
    return encode(ds)


def with_uid(name: str, value: str) -> bytes:
    ds = good_dataset()
    setattr(ds, name, value)
    return encode(ds)


BAD_DATASETS = {
    "no SeriesInstanceUID": (lambda: without("SeriesInstanceUID"), 0xA900, "SeriesInstanceUID is missing"),
    "no SOPInstanceUID": (lambda: without("SOPInstanceUID"), 0xA900, "SOPInstanceUID is missing"),
    "no SOPClassUID": (lambda: without("SOPClassUID"), 0xA900, "SOPClassUID is missing"),
    "a study UID that climbs out of the spool": (
        lambda: with_uid("StudyInstanceUID", "../../../escaped"), 0xA900, "is not a valid UID"),
    "an instance UID with a slash": (
        lambda: with_uid("SOPInstanceUID", "1.2.3/4"), 0xA900, "is not a valid UID"),
    "random bytes": (lambda: random.Random(SEED).randbytes(3000), (0xA900, 0xC000), ""),
    "pixel data cut short": (lambda: encode(good_dataset())[:-5000], 0xC000, "cannot be parsed"),
    "a header cut in the middle of an element": (
        lambda: encode(good_dataset())[:1001], 0xC000, "cannot be parsed"),
    "nothing at all": (lambda: b"", 0xA900, "is missing"),
}


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    process = NodeProcess(tmp_path_factory.mktemp("bad-datasets"), idle_timeout=1.0).start()
    yield process
    process.stop()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # set on purpose
@pytest.mark.parametrize("case", BAD_DATASETS)
def test_a_data_set_that_cannot_be_used_gets_a_failure_status_and_the_association_goes_on(shared_node, case):
    make, statuses, problem = BAD_DATASETS[case]
    allowed = statuses if isinstance(statuses, tuple) else (statuses,)
    offset = fault_offset(shared_node)
    good = good_dataset()
    client = WireClient.connect(shared_node.port)
    assert client.associate(calling="BADSCU") == "accepted"
    answered = client.c_store(make(), sop_uid="1.2.826.0.1.3680043.8.498.555")
    assert answered in allowed, f"0x{answered:04X}"
    assert client.c_store(encode(good), sop_uid=good.SOPInstanceUID) == 0x0000
    client.release()
    shared_node.wait_for_deliveries(good.StudyInstanceUID)
    log = shared_node.log()[offset:]
    assert re.search(rf"WARNING .*C-STORE from BADSCU: instance 1\.2\.826\.0\.1\.3680043\.8\.498\.555 "
                     rf"refused with 0x{answered:04X}: .*{re.escape(problem)}", log), log
    assert not (shared_node.root / "escaped").exists() and not (shared_node.spool.parent / "escaped").exists()
    wait_for(lambda: spool_leftovers(shared_node) == [], 10, "the spool to empty")
