"""For tests of the layers above the receiver: instances spooled as the C-STORE handler spools them,
a delivery worker with a fake journal clock and no jitter, and a sink that records what it took."""

from __future__ import annotations

import struct
from io import BytesIO

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from mapping.options import MappingOptions
from scp.pipeline.retry import RetryPolicy
from scp.pipeline.worker import DeliveryWorker
from scp.receive.dataset import ReceivedInstance, header_file, parse_received
from scp.store.dead_letter import DeadLetterBox
from scp.store.journal import Journal

CT = get_testdata_file("CT_small.dcm")


def received(study_uid: str, patient_id: str = "PID1", series_uid: str | None = None) -> ReceivedInstance:
    """A real CT data set as a C-STORE carries it, parsed as the handler parses it."""
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
    return parse_received(dataset, "1.2.840.10008.1.2.1")


def spool_instance(spool, study_uid: str, patient_id: str = "PID1", series_uid: str | None = None) -> str:
    """Spool one real CT header as the C-STORE handler would (calling AE TEST, no address)."""
    instance = received(study_uid, patient_id, series_uid)
    spool.store(study_uid, instance.sop_uid, header_file(instance, "TEST"))
    return instance.sop_uid


def make_worker(tmp_path, spool, sinks, clock, **kwargs):
    return DeliveryWorker(spool, sinks, MappingOptions(), dead_letters=DeadLetterBox(tmp_path / "dead"),
                          journal=Journal(tmp_path / "deliveries.jsonl", wall_clock=lambda: 0.0),
                          clock=clock, rand=lambda: 1.0, retry=RetryPolicy(max_backoff=60), **kwargs)


class RecordingSink:
    """A destination that records the instance UIDs of each delivery; raises the given failures first."""

    def __init__(self, name: str = "rec", failures: list[Exception] | None = None) -> None:
        self.name = name
        self.failures = list(failures or [])
        self.delivered: list[set[str]] = []

    def deliver(self, resources) -> str:
        if self.failures:
            raise self.failures.pop(0)
        uids = {i["uid"] for s in resources.imaging_study["series"] for i in s["instance"]}
        self.delivered.append(uids)
        return f"{len(uids)} instance(s)"
