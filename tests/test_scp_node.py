"""The node, started as `dicom-fhir-scp serve` in a subprocess, fed by real senders.

dcmtk storescu (uncompressed), dcmtk dcmsend (compressed files from pydicom's test data,
each proposed in its own transfer syntax), pynetdicom as SCU. Idle timeouts are short
(about 1 s) and every wait is a wait-for-condition.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, build_context
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.clocks import wait_for
from tests.conftest import require_tool
from tests.dicomgen import generate_study
from tests.scp_node import NodeProcess, imaging_study, instance_uids, node  # noqa: F401 (fixture)
from tests.scu import keep_responses

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

COMPRESSED = ["693_J2KI.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm",
              "SC_rgb_rle.dcm", "image_dfl.dcm"]


def storescu(node: NodeProcess, *paths: Path, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    tool = require_tool("storescu")
    return subprocess.run([tool, "-aet", calling, "-aec", node.ae_title, "+sd", "127.0.0.1", str(node.port),
                           *map(str, paths)], capture_output=True, text=True, timeout=120)


def pynetdicom_store(node: NodeProcess, items, *, calling: str = "PYSCU", contexts=None) -> list[int]:
    """Send files or datasets over one association; the status of each C-STORE (None: not sent)."""
    ae = AE(ae_title=calling)
    if contexts is None:
        contexts = [build_context(CTImageStorage), build_context("1.2.840.10008.5.1.4.1.1.4")]
    ae.requested_contexts = contexts
    assoc = keep_responses(ae.associate("127.0.0.1", node.port, ae_title=node.ae_title))
    assert assoc.is_established, "association refused"
    try:
        return [getattr(assoc.send_c_store(item), "Status", None) for item in items]
    finally:
        assoc.release()


# --- what was sent arrives ------------------------------------------------------------------


def test_a_study_sent_with_storescu_arrives_with_every_instance_and_series(tmp_path, node):
    study = generate_study(tmp_path / "study", n_instances=12, n_series=3)
    scp = node()
    result = storescu(scp, study.files[0].parent)
    assert result.returncode == 0, result.stderr
    [delivery] = scp.wait_for_deliveries(study.study_uid)
    assert delivery["instances"] == 12
    document = scp.output_of(study.study_uid)
    assert instance_uids(document) == set(study.sop_uids)
    assert imaging_study(document)["numberOfSeries"] == 3
    assert "association from STORESCU at 127.0.0.1" in scp.log() and "12 instance(s) stored, 0 failed" in scp.log()


def test_spool_files_are_removed_once_the_study_was_delivered(tmp_path, node):
    study = generate_study(tmp_path / "study", n_instances=4, n_series=1)
    scp = node()
    storescu(scp, *study.files)
    scp.wait_for_deliveries(study.study_uid)
    wait_for(lambda: not (scp.spool / study.study_uid).exists(), 5, "the study's spool folder to go")
    assert sorted(p.name for p in scp.spool.iterdir()) == [".lock", "deliveries.jsonl"]  # the node's lock stays


def test_compressed_files_sent_with_dcmsend_are_stored_in_their_own_transfer_syntax(tmp_path, node):
    tool = require_tool("dcmsend")
    folder = tmp_path / "compressed"
    folder.mkdir()
    expected: dict[str, set[str]] = {}
    syntaxes = set()
    for name in COMPRESSED:
        path = get_testdata_file(name)
        assert path is not None, name
        shutil.copy(path, folder / name)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected.setdefault(ds.StudyInstanceUID, set()).add(ds.SOPInstanceUID)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
    assert len(syntaxes) >= 5
    scp = node()
    result = subprocess.run([tool, "-aec", scp.ae_title, "-nh", "-nuc", "+sd", "+r", "127.0.0.1", str(scp.port),
                             str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for study_uid, sops in expected.items():
        scp.wait_for_deliveries(study_uid)
        assert instance_uids(scp.output_of(study_uid)) == sops


def test_pynetdicom_can_send_datasets_in_big_endian_and_deflated_syntaxes(tmp_path, node):
    scp = node()
    big_endian = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    contexts = [build_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.2")]
    assert pynetdicom_store(scp, [big_endian], contexts=contexts) == [0x0000]
    scp.wait_for_deliveries(big_endian.StudyInstanceUID)
    assert instance_uids(scp.output_of(big_endian.StudyInstanceUID)) == {big_endian.SOPInstanceUID}


def test_c_echo_is_answered(node):
    scp = node()
    result = subprocess.run([require_tool("echoscu"), "-aec", scp.ae_title, "127.0.0.1", str(scp.port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    ae = AE()
    ae.add_requested_context(Verification)
    assoc = keep_responses(ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title))
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


# --- completion -------------------------------------------------------------------------------


def test_resending_a_study_changes_nothing_in_the_output(tmp_path, node):
    study = generate_study(tmp_path / "study", n_instances=5, n_series=1)
    scp = node()
    storescu(scp, *study.files)
    scp.wait_for_deliveries(study.study_uid)
    first = scp.output_of(study.study_uid)
    storescu(scp, *study.files)
    second_delivery = scp.wait_for_deliveries(study.study_uid, 2)[-1]
    assert second_delivery["instances"] == 5
    assert scp.output_of(study.study_uid) == first


def test_a_study_split_over_two_associations_with_a_short_pause_completes_once(tmp_path, node):
    study = generate_study(tmp_path / "study", n_instances=6, n_series=2)
    scp = node(idle_timeout=2.0)
    # Two senders, two associations, a pause between them (the second storescu's start) shorter
    # than the idle timeout: one delivery of all six. That no second completion follows later is
    # shown with a fake clock (test_scp_completion.py, same name), without sleeping here.
    storescu(scp, *study.files[:3], calling="FIRST")
    storescu(scp, *study.files[3:], calling="SECOND")
    [delivery] = scp.wait_for_deliveries(study.study_uid)
    assert delivery["instances"] == 6
    assert instance_uids(scp.output_of(study.study_uid)) == set(study.sop_uids)


def test_a_second_burst_after_completion_is_merged_into_the_output(tmp_path, node):
    first = generate_study(tmp_path / "first", n_instances=4, n_series=1)
    second = generate_study(tmp_path / "second", n_instances=3, study_uid=first.study_uid,
                            series_uids=("1.2.826.0.1.3680043.8.498.77",), first_instance=5)
    scp = node()
    storescu(scp, *first.files)
    scp.wait_for_deliveries(first.study_uid)
    storescu(scp, *second.files)
    scp.wait_for_deliveries(first.study_uid, 2)
    document = scp.output_of(first.study_uid)
    assert instance_uids(document) == set(first.sop_uids) | set(second.sop_uids)
    assert imaging_study(document)["numberOfSeries"] == 2
    assert imaging_study(document)["numberOfInstances"] == 7


def test_studies_left_in_the_spool_are_delivered_after_a_restart(tmp_path, node):
    study = generate_study(tmp_path / "study", n_instances=5, n_series=1)
    scp = node(idle_timeout=600)
    storescu(scp, *study.files)
    assert scp.stop() == 0  # SIGTERM: graceful, the spool is kept
    assert scp.spooled(study.study_uid) == set(study.sop_uids)
    assert scp.output_of(study.study_uid) is None
    scp.start(idle_timeout=1)
    scp.wait_for_deliveries(study.study_uid)
    assert instance_uids(scp.output_of(study.study_uid)) == set(study.sop_uids)
    assert "resuming 1 study(ies)" in scp.log()


def test_the_spooled_header_leaves_out_pixel_data(tmp_path, node):
    study = generate_study(tmp_path / "study", n_instances=1, n_series=1)
    scp = node(idle_timeout=600)
    storescu(scp, *study.files)
    [spooled] = (scp.spool / study.study_uid).glob("*.dcm")
    ds = pydicom.dcmread(spooled)
    assert "PixelData" not in ds
    assert ds.SOPInstanceUID == study.sop_uids[0]
    assert ds.file_meta.SourceApplicationEntityTitle == "STORESCU"
    assert spooled.stat().st_size < study.files[0].stat().st_size / 3


# --- bad input --------------------------------------------------------------------------------


def _truncated_file(source: Path, target: Path) -> Path:
    """A Part 10 file whose data set stops in the middle of an element."""
    raw = source.read_bytes()
    (meta_length,) = struct.unpack_from("<L", raw, 140)
    target.write_bytes(raw[:144 + meta_length + 1000])
    return target


def test_bad_instances_get_failure_statuses_while_good_ones_in_the_same_association_are_stored(
        tmp_path, node, monkeypatch):
    # Files go out as they are on disk (a truncated one included), not decoded and re-encoded.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    study = generate_study(tmp_path / "study", n_instances=2, n_series=1)
    no_study_uid = pydicom.dcmread(study.files[0])
    no_study_uid.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    del no_study_uid.StudyInstanceUID
    truncated = _truncated_file(study.files[1], tmp_path / "truncated.dcm")
    scp = node()
    statuses = pynetdicom_store(scp, [study.files[0], no_study_uid, truncated, study.files[1]], calling="MODALITY",
                                contexts=[build_context(CTImageStorage, "1.2.840.10008.1.2.1")])
    assert statuses[0] == 0x0000 and statuses[3] == 0x0000
    assert statuses[1] == 0xA900
    assert statuses[2] & 0xF000 in (0xA000, 0xC000)
    scp.wait_for_deliveries(study.study_uid)
    assert instance_uids(scp.output_of(study.study_uid)) == set(study.sop_uids)
    log = scp.log()
    assert "C-STORE from MODALITY: instance 1.2.826.0.1.3680043.8.498.1 refused with 0xA900: " \
           "StudyInstanceUID is missing or empty" in log
    assert "cannot be parsed" in log
    assert "2 instance(s) stored, 2 failed" in log


def test_an_unknown_sop_class_is_refused_unless_enabled(tmp_path, node):
    private_class = "1.2.826.0.1.3680043.8.498.999.1"
    ds = pydicom.dcmread(generate_study(tmp_path / "study", n_instances=1, n_series=1).files[0])
    ds.SOPClassUID = private_class
    ds.file_meta.MediaStorageSOPClassUID = private_class
    strict = node()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(private_class)
    assoc = keep_responses(ae.associate("127.0.0.1", strict.port, ae_title=strict.ae_title))
    assert not assoc.is_established or not assoc.accepted_contexts
    if assoc.is_established:
        assoc.release()
    lenient = node("--accept-unknown-sop-classes")
    contexts = [build_context(private_class)]
    assert pynetdicom_store(lenient, [ds], contexts=contexts) == [0x0000]
    lenient.wait_for_deliveries(ds.StudyInstanceUID)
    assert instance_uids(lenient.output_of(ds.StudyInstanceUID)) == {ds.SOPInstanceUID}


# --- access control ----------------------------------------------------------------------------


def _associate(node: NodeProcess, calling: str, called: str):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=called)


def test_a_calling_ae_title_not_on_the_allow_list_is_rejected_and_logged(node):
    scp = node(config='[security]\nallowed_calling_aets = ["MODALITY"]\n')
    refused = _associate(scp, "INTRUDER", scp.ae_title)
    assert refused.is_rejected
    allowed = _associate(scp, "MODALITY", scp.ae_title)
    assert allowed.is_established
    allowed.release()
    assert "calling AE title 'INTRUDER' is not in security.allowed_calling_aets" in scp.log()


def test_a_wrong_called_ae_title_is_rejected(node):
    scp = node()
    assoc = _associate(scp, "MODALITY", "SOMEONEELSE")
    assert assoc.is_rejected
    assert "called AE title 'SOMEONEELSE' is not this node's" in scp.log()


def test_a_peer_address_not_on_the_allow_list_is_rejected(node):
    scp = node(config='[security]\nallowed_addresses = ["10.0.0.0/8"]\n')
    assoc = _associate(scp, "MODALITY", scp.ae_title)
    assert assoc.is_rejected
    assert "peer address 127.0.0.1 is not in security.allowed_addresses" in scp.log()
