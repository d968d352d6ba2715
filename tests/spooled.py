"""For tests of the layers above the receiver: instances spooled as the C-STORE handler spools them,
and a delivery worker with a fake journal clock and no jitter."""

from __future__ import annotations

import struct
from io import BytesIO

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from mapping.options import MappingOptions
from scp.pipeline.retry import RetryPolicy
from scp.pipeline.worker import DeliveryWorker
from scp.receive.dataset import header_file, parse_received
from scp.store.dead_letter import DeadLetterBox
from scp.store.journal import Journal

CT = get_testdata_file("CT_small.dcm")


def spool_instance(spool, study_uid: str, patient_id: str = "PID1", series_uid: str | None = None) -> str:
    """Spool one real CT header, as the C-STORE handler would."""
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or study_uid + ".1"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    (meta_length,) = struct.unpack_from("<L", raw, 140)
    dataset = raw[144 + meta_length:]  # the data set as it travels in a C-STORE (explicit VR little endian)
    instance = parse_received(dataset, "1.2.840.10008.1.2.1")
    spool.store(study_uid, instance.sop_uid, header_file(instance, "TEST"))
    return instance.sop_uid


def make_worker(tmp_path, spool, sinks, clock, **kwargs):
    return DeliveryWorker(spool, sinks, MappingOptions(), dead_letters=DeadLetterBox(tmp_path / "dead"),
                          journal=Journal(tmp_path / "deliveries.jsonl", wall_clock=lambda: 0.0),
                          clock=clock, rand=lambda: 1.0, retry=RetryPolicy(max_backoff=60), **kwargs)
