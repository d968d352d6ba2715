"""Large DICOM instances for the memory tests and benchmarks, generated streaming to disk.

A real header (pydicom's CT_small.dcm, new UIDs) followed by a native Pixel Data element
whose value is a hole in a sparse file: a 2 GB instance costs neither 2 GB of memory nor
2 GB of disk writes to make, and reads back as zeros.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.dicomgen import template_dataset


def large_instance(path: Path, size: int, study_uid: str | None = None) -> pydicom.Dataset:
    """Write a CT instance of about `size` bytes (16-bit frames of 512 x 512) to path; its header back."""
    frame = 512 * 512 * 2
    frames = max(1, size // frame)
    ds = template_dataset()
    for tag in [tag for tag in ds.keys() if tag >= 0x7FE00000]:  # Pixel Data and trailing padding go
        del ds[tag]
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel = 1
    ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)
    length = frames * frame
    with open(path, "r+b") as f:
        f.seek(0, 2)
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
        f.truncate(f.tell() + length)  # the pixel values: a hole, zeros when read
    return ds


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """A process's VmHWM (peak resident set) or VmRSS, from /proc, in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status)[1]) / 1024
