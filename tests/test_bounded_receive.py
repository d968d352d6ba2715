"""Memory bounded by design: large instances go to disk as they arrive, deflate bombs cost nothing.

The node runs as a subprocess (tests/scp_node.py); its peak resident set is read from
/proc/PID/status (VmHWM). Large instances are generated streaming into sparse files
(tests/bigfiles.py) and sent by dcmtk storescu with TCP_NODELAY=1. The bounds are the
issue's (one 2 GB instance < 300 MB, four 500 MB at once < 400 MB); the figures against a
baseline are in benchmarks/memory.py.
"""

from __future__ import annotations

import os
import subprocess
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from scp.receive.dataset import SPILL_THRESHOLD, BadInstance, IncomingDataSet, clear_incoming, inflate_header, parse_received
from scp.receive.status import CANNOT_UNDERSTAND, INVALID_SOP_INSTANCE
from tests.bigfiles import large_instance, rss_mb
from tests.conftest import require_tool
from tests.dicom_wire import WireClient
from tests.dicomgen import template_dataset
from tests.scp_node import NodeProcess, instance_uids
from tests.scu import associate

pytestmark = pytest.mark.interop

DEFLATED = str(DeflatedExplicitVRLittleEndian)


def encode(ds: pydicom.Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def deflate_bomb(inflated: int) -> tuple[bytes, str]:
    """A deflated data set: a real header, then a private OB element of `inflated` zero bytes, then Pixel
    Data. A few hundred KB on the wire per GB inflated. Returns (bytes, SOP Instance UID)."""
    ds = template_dataset()
    for tag in [tag for tag in ds.keys() if tag >= 0x7FE00000]:  # Pixel Data, trailing padding
        del ds[tag]
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [compressor.compress(encode(ds)), compressor.compress(b"\x29\x00\x10\x10OB\x00\x00"
                                                                + inflated.to_bytes(4, "little"))]
    zeros = bytes(1 << 20)
    for _ in range(inflated >> 20):
        out.append(compressor.compress(zeros))
    out.append(compressor.compress(b"\xe0\x7f\x10\x00OW\x00\x00\x00\x00\x00\x00"))
    out.append(compressor.flush())
    return b"".join(out), ds.SOPInstanceUID


def storescu(port: int, *files: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([require_tool("storescu"), "-aet", "BIGSCU", "-aec", "FHIRSCP", "127.0.0.1", str(port),
                           *map(str, files)], env=env, capture_output=True, text=True, timeout=timeout)


def data_set_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its file meta."""
    with open(path, "rb") as f:
        pydicom.filereader.read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        return f.read()


# --- the deflate cap, as a function --------------------------------------------------------------

def test_a_deflate_bomb_is_refused_before_it_is_inflated():
    bomb, _ = deflate_bomb(256 << 20)
    with pytest.raises(BadInstance) as refused:
        inflate_header(bomb, 4 << 20)
    assert refused.value.status == CANNOT_UNDERSTAND
    assert "max_header_bytes" in refused.value.problem


def test_a_deflated_data_set_is_inflated_only_up_to_its_pixel_data():
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("image_dfl.dcm"))
    plain = encode(ds)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(plain) + compressor.flush()
    header = bytes(inflate_header(deflated, 1 << 20))
    assert header == plain[:plain.index(b"\xe0\x7f\x10\x00")]
    instance = parse_received(deflated, DEFLATED)
    assert instance.sop_uid == ds.SOPInstanceUID and instance.header == header


# --- on the wire ---------------------------------------------------------------------------------

def test_an_empty_affected_sop_instance_uid_gets_a_failure_status_at_once(tmp_path):
    node = NodeProcess(tmp_path / "n").start()
    try:
        client = WireClient.connect(node.port, timeout=10)  # an abort after 60 s would fail the read
        assert client.associate() == "accepted"
        assert client.c_store(encode(template_dataset()), sop_uid="") == INVALID_SOP_INSTANCE
        assert client.c_store(encode(template_dataset()), sop_uid=None) == INVALID_SOP_INSTANCE
        assert client.c_echo() == 0x0000
        client.release()
        assert "Affected SOP Instance UID is empty or missing" in node.log()
    finally:
        node.stop()


def test_a_deflate_bomb_is_refused_with_c000_and_the_node_keeps_serving(tmp_path):
    node = NodeProcess(tmp_path / "n").start()
    try:
        bomb, sop_uid = deflate_bomb(1 << 30)
        assert len(bomb) < 2 << 20
        client = WireClient.connect(node.port, timeout=30)
        assert client.associate(transfer_syntax=DEFLATED) == "accepted"
        assert client.c_store(bomb, sop_uid=sop_uid) == CANNOT_UNDERSTAND
        assert client.c_echo() == 0x0000
        client.release()
        assert rss_mb(node.process.pid) < 200
        assert f"instance {sop_uid} refused with 0xC000" in node.log()
        ds = template_dataset()
        ds.StudyInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        assoc = associate(node.port)
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        node.wait_for_deliveries(ds.StudyInstanceUID)
    finally:
        node.stop()


def test_a_deflated_instance_is_accepted_with_its_header(tmp_path):
    node = NodeProcess(tmp_path / "n").start()
    try:
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("image_dfl.dcm"))
        assoc = associate(node.port, contexts=[(ds.SOPClassUID, DeflatedExplicitVRLittleEndian)])
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        node.wait_for_deliveries(ds.StudyInstanceUID)
        document = node.output_of(ds.StudyInstanceUID)
        assert instance_uids(document) == {ds.SOPInstanceUID}
        assert ds.SeriesInstanceUID in str(document)
    finally:
        node.stop()


def test_the_archive_takes_a_large_instance_by_rename_byte_identical(tmp_path):
    source = tmp_path / "big.dcm"
    ds = large_instance(source, 40 << 20)
    with open(source, "r+b") as f:  # pixel values that are not all zeros, to compare
        f.seek(-(1 << 20), 2)
        f.write(os.urandom(1 << 20))
    archive = tmp_path / "archive"
    archive.mkdir()
    node = NodeProcess(tmp_path / "n", "--archive-dir", str(archive)).start()
    try:
        result = storescu(node.port, source)
        assert result.returncode == 0, result.stderr
        node.wait_for_deliveries(ds.StudyInstanceUID)
        kept = archive / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert data_set_bytes(kept) == data_set_bytes(source)
        assert pydicom.dcmread(kept, stop_before_pixels=True).file_meta.SourceApplicationEntityTitle == "BIGSCU"
        assert not [p for p in (archive / ".incoming").iterdir()]
    finally:
        node.stop()


def test_peak_rss_receiving_a_2_gb_instance_stays_under_300_mb(tmp_path):
    source = tmp_path / "2g.dcm"
    ds = large_instance(source, 2 << 30)
    node = NodeProcess(tmp_path / "n").start()
    try:
        result = storescu(node.port, source)
        assert result.returncode == 0, result.stderr
        node.wait_for_deliveries(ds.StudyInstanceUID)
        assert rss_mb(node.process.pid) < 300
        assert not list((node.spool / ".incoming").iterdir())
    finally:
        node.stop()


def test_peak_rss_receiving_four_500_mb_instances_at_once_stays_under_400_mb(tmp_path):
    sources = [tmp_path / f"{n}.dcm" for n in range(4)]
    studies = [large_instance(path, 500 << 20).StudyInstanceUID for path in sources]
    node = NodeProcess(tmp_path / "n").start()
    try:
        env = {**os.environ, "TCP_NODELAY": "1"}
        senders = [subprocess.Popen([require_tool("storescu"), "-aet", f"BIG{n}", "-aec", "FHIRSCP", "127.0.0.1",
                                     str(node.port), str(path)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE) for n, path in enumerate(sources)]
        for sender in senders:
            assert sender.wait(120) == 0, sender.stderr.read()
        for study in studies:
            node.wait_for_deliveries(study)
        assert rss_mb(node.process.pid) < 400
    finally:
        node.stop()


def test_max_header_bytes_below_64_kib_is_a_configuration_error():
    from mapping.errors import ConfigurationError
    from scp.config import NodeConfig
    with pytest.raises(ConfigurationError, match="node.max_header_bytes"):
        NodeConfig(max_header_bytes=1000)


def test_peak_rss_receiving_a_large_instance_from_pynetdicom_stays_bounded(tmp_path, monkeypatch):
    # pynetdicom sends a data set in PDUs as large as the receiver allows: with no limit, one PDU of the
    # whole instance, held in memory before any of it reaches the disk. node.max_pdu's default bounds it.
    from pynetdicom import _config as pynetdicom_config
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)  # the sender's memory, not ours
    source = tmp_path / "big.dcm"
    ds = large_instance(source, 300 << 20)
    node = NodeProcess(tmp_path / "n").start()
    try:
        assoc = associate(node.port)
        assert assoc.send_c_store(source).Status == 0x0000
        assoc.release()
        node.wait_for_deliveries(ds.StudyInstanceUID)
        assert rss_mb(node.process.pid) < 200
    finally:
        node.stop()


def test_a_large_deflated_instance_is_read_from_its_file_and_accepted(tmp_path):
    # More than SPILL_THRESHOLD on the wire (incompressible pixel values): inflated from the temporary file.
    ds = template_dataset()
    for tag in [tag for tag in ds.keys() if tag >= 0x7FE00000]:
        del ds[tag]
    ds.StudyInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    pixels = os.urandom(4 << 20)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = (compressor.compress(encode(ds) + b"\xe0\x7f\x10\x00OW\x00\x00" + len(pixels).to_bytes(4, "little")
                                    + pixels) + compressor.flush())
    assert len(deflated) > SPILL_THRESHOLD
    node = NodeProcess(tmp_path / "n").start()
    try:
        client = WireClient.connect(node.port, timeout=30)
        assert client.associate(transfer_syntax=DEFLATED) == "accepted"
        assert client.c_store(deflated, sop_uid=ds.SOPInstanceUID) == 0x0000
        client.release()
        node.wait_for_deliveries(ds.StudyInstanceUID)
        assert instance_uids(node.output_of(ds.StudyInstanceUID)) == {ds.SOPInstanceUID}
    finally:
        node.stop()


def test_a_large_instance_cut_short_in_its_pixel_data_is_refused_and_leaves_no_file(tmp_path):
    ds = template_dataset()
    for tag in [tag for tag in ds.keys() if tag >= 0x7FE00000]:
        del ds[tag]
    ds.StudyInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    cut = encode(ds) + b"\xe0\x7f\x10\x00OW\x00\x00" + (8 << 20).to_bytes(4, "little") + bytes(4 << 20)
    node = NodeProcess(tmp_path / "n").start()
    try:
        client = WireClient.connect(node.port, timeout=30)
        assert client.associate() == "accepted"
        assert client.c_store(cut, sop_uid=ds.SOPInstanceUID) == CANNOT_UNDERSTAND
        assert client.c_echo() == 0x0000
        client.release()
        assert not node.spooled(ds.StudyInstanceUID)
        assert not list((node.spool / ".incoming").iterdir())
        assert "unexpected error" not in node.log()
    finally:
        node.stop()


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_store_file_moves_a_whole_instance_file_in(tmp_path, kind):
    from scp.store.spool import FileSpool, MemorySpool
    spool = FileSpool(tmp_path / "archive") if kind == "file" else MemorySpool()
    received = tmp_path / "received.tmp"
    received.write_bytes(b"whole instance")
    spool.store_file("1.2.3", "1.2.3.4", received)
    assert not received.exists()
    assert [i.data for i in spool.read("1.2.3", ["1.2.3.4"])] == [b"whole instance"]


def test_a_spilled_data_set_file_is_named_for_the_process_receiving_it(tmp_path):
    incoming = IncomingDataSet(tmp_path / ".incoming", lambda: b"", threshold=4)
    incoming.write(b"x" * 10)
    assert incoming.path is not None and incoming.path.name.startswith(f"{os.getpid()}-")
    incoming.discard()


def test_clearing_one_ended_workers_files_leaves_the_others_receiving(tmp_path):
    folder = tmp_path / ".incoming"
    folder.mkdir()
    (folder / "111-a.tmp").write_bytes(b"x")
    (folder / "222-b.tmp").write_bytes(b"x")
    assert clear_incoming(folder, 111) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["222-b.tmp"]


def test_clearing_at_start_removes_every_file_and_the_folder(tmp_path):
    folder = tmp_path / ".incoming"
    folder.mkdir()
    (folder / "111-a.tmp").write_bytes(b"x")
    (folder / "0123abcd.tmp").write_bytes(b"x")  # named by an older version
    assert clear_incoming(folder) == 2
    assert not folder.exists()
