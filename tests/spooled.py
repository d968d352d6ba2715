"""Instances spooled as the C-STORE handler spools them, for tests of the layers above the receiver."""

from __future__ import annotations

import struct
from io import BytesIO

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from scp.receive.dataset import header_file, parse_received

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
