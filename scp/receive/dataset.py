"""A received C-STORE data set, read just enough to spool it (the per-instance hot path).

pynetdicom hands the handler the raw data set bytes. Decoding them with pydicom costs
about 1 ms per instance, as much as the whole network exchange, so this module walks
the top-level elements itself: it collects the four UIDs the node needs, checks the
element structure is complete, and finds where bulk data starts. Values are never
decoded otherwise; pixel data is never touched.

The spooled header is every top-level element before group 7FE0 (Pixel Data, Float
and Double Float Pixel Data, Extended Offset Table), minus other top-level elements
longer than BULK_THRESHOLD (overlay data, encapsulated documents, large private blobs),
which the mapping never needs. Deflated data sets are inflated and spooled as Explicit
VR Little Endian (deflate's inner encoding), so every spool file reads without zlib.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from scp.dicom.elements import PIXEL_DATA_GROUP, encoding, top_level
from scp.errors import DicomFhirError
from scp.receive.status import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH
from scp.store.layout import is_safe_uid
from scp.store.part10 import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, file_meta

BULK_THRESHOLD = 64 * 1024

_WANTED = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID",
           0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID"}


class BadInstance(DicomFhirError):
    """The data set cannot be spooled; `status` is the DIMSE failure status to answer with."""

    def __init__(self, status: int, problem: str) -> None:
        super().__init__(problem)
        self.status = status
        self.problem = problem


@dataclass(frozen=True)
class ReceivedInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    header: bytes  # the data set up to bulk data, encoded in header_syntax
    header_syntax: str
    dataset: bytes | memoryview  # the whole data set as received (for archive_dir)
    transfer_syntax: str  # of dataset


def parse_received(data: bytes | memoryview, transfer_syntax: str) -> ReceivedInstance:
    """UIDs and header bytes of a received data set; BadInstance when it cannot be spooled."""
    header_syntax = transfer_syntax
    plain = data
    if transfer_syntax == DEFLATED_LE:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            plain = inflater.decompress(data) + inflater.flush()
        except zlib.error as exc:
            raise BadInstance(CANNOT_UNDERSTAND, f"deflated data set cannot be inflated ({exc})") from exc
        header_syntax = EXPLICIT_LE
    implicit = header_syntax == IMPLICIT_LE
    little = header_syntax != EXPLICIT_BE
    if not implicit and little and len(plain) >= 6 and not bytes(plain[4:6]).isalpha():
        # Encoded implicit although the context says explicit (some archives do): read it as it is.
        implicit, header_syntax = True, IMPLICIT_LE
    try:
        ranges, values = _scan(plain, implicit, little)
    except (struct.error, IndexError, RecursionError, ValueError) as exc:
        raise BadInstance(CANNOT_UNDERSTAND, f"data set cannot be parsed ({exc})") from exc
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = values.get(name)
        if not value:
            raise BadInstance(DATA_SET_DOES_NOT_MATCH, f"{name} is missing or empty")
        if name != "SOPClassUID" and not is_safe_uid(value):
            raise BadInstance(DATA_SET_DOES_NOT_MATCH, f"{name} {value[:70]!r} is not a valid UID")
    if len(ranges) == 1:
        start, end = ranges[0]
        header = bytes(plain[start:end])
    else:
        header = b"".join(bytes(plain[s:e]) for s, e in ranges)
    return ReceivedInstance(values["StudyInstanceUID"], values["SeriesInstanceUID"], values["SOPInstanceUID"],
                            values["SOPClassUID"], header, header_syntax, data, transfer_syntax)


def header_file(instance: ReceivedInstance, source_ae: str = "", source_address: str = "") -> list[bytes]:
    """The spool file's contents (chunks): file meta + header bytes (scp.store.part10).

    source_ae, source_address: who sent it (the calling AE title, the peer's presentation address
    URI), recorded in the file meta so that the sender travels with the instance to its delivery."""
    return [file_meta(instance.sop_class_uid, instance.sop_uid, instance.header_syntax, source_ae, source_address),
            instance.header]


def full_file(instance: ReceivedInstance, source_ae: str = "", source_address: str = "") -> list[bytes | memoryview]:
    """The archive file's contents (chunks): file meta (with the sender, as in the spool) + the data set
    exactly as received."""
    return [file_meta(instance.sop_class_uid, instance.sop_uid, instance.transfer_syntax, source_ae, source_address),
            instance.dataset]


def _scan(data: bytes | memoryview, implicit: bool, little: bool) -> tuple[list[tuple[int, int]], dict[str, str]]:
    """Walk the top-level elements: ([(start, end) byte ranges to keep], {wanted name: value}).

    Kept: everything before Pixel Data (group 7FE0), less elements longer than BULK_THRESHOLD.
    Pixel Data itself is not kept, but it must be whole: an instance cut short in its pixel
    data is not stored.
    """
    values: dict[str, str] = {}
    ranges: list[tuple[int, int]] = []
    keep_from = pos = 0
    for tag, _vr, _length, start, end in top_level(data, encoding(implicit, little)):
        if tag >= PIXEL_DATA_GROUP:
            break
        if tag in _WANTED:
            values[_WANTED[tag]] = bytes(data[start:end]).decode("ascii", "replace").strip("\x00 ")
        if end - pos > BULK_THRESHOLD:
            ranges.append((keep_from, pos))
            keep_from = end
        pos = end
    ranges.append((keep_from, pos))
    return [r for r in ranges if r[1] > r[0]] or [(0, 0)], values
