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

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

from scp.store.spool import is_safe_uid

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

# Under pydicom's UID root, derived from the name (stable): identifies the writer of spool files.
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["dicom-fhir-scp"])
IMPLEMENTATION_VERSION = "DICOMFHIRSCP_01"
BULK_THRESHOLD = 64 * 1024

# DIMSE C-STORE failure statuses (PS3.4 Table B.2-1)
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000  # processing failure: the data set cannot be parsed
PROCESSING_FAILURE = 0x0110

_WANTED = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID",
           0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID"}
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_VR_NAMES = {vr.encode(): vr for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW",
    "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV")}
_BULK_GROUP = 0x7FE00000


class BadInstance(Exception):
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


def file_meta(sop_class_uid: str, sop_uid: str, transfer_syntax: str, source_ae: str = "") -> bytes:
    """Preamble, DICM prefix and File Meta Information group (PS3.10 7.1) for a Part 10 file."""
    body = b"".join([
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _uid_bytes(sop_class_uid)),
        _element(0x0002, 0x0003, b"UI", _uid_bytes(sop_uid)),
        _element(0x0002, 0x0010, b"UI", _uid_bytes(transfer_syntax)),
        _element(0x0002, 0x0012, b"UI", _uid_bytes(IMPLEMENTATION_CLASS_UID)),
        _element(0x0002, 0x0013, b"SH", _text_bytes(IMPLEMENTATION_VERSION)),
    ])
    ae = source_ae.strip().encode("ascii", "replace")[:16]
    if ae:
        body += _element(0x0002, 0x0016, b"AE", _text_bytes(ae.decode("ascii")))
    return b"\x00" * 128 + b"DICM" + _element(0x0002, 0x0000, b"UL", struct.pack("<L", len(body))) + body


def header_file(instance: ReceivedInstance, source_ae: str = "") -> list[bytes]:
    """The spool file's contents (chunks): file meta + header bytes."""
    return [file_meta(instance.sop_class_uid, instance.sop_uid, instance.header_syntax, source_ae), instance.header]


def full_file(instance: ReceivedInstance, source_ae: str = "") -> list[bytes | memoryview]:
    """The archive file's contents (chunks): file meta + the data set exactly as received."""
    return [file_meta(instance.sop_class_uid, instance.sop_uid, instance.transfer_syntax, source_ae),
            instance.dataset]


def header_dataset(data: bytes) -> Dataset:
    """A spool file (as written by header_file) as a pydicom Dataset of raw, unconverted elements.

    Much cheaper than pydicom.dcmread: pydicom converts an element only when it is read,
    and mapping.InstanceHeader reads a few dozen. ValueError when the file is not one
    this module wrote (the caller falls back to pydicom).
    """
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a spool file (no DICM prefix and group length)")
    (group_length,) = struct.unpack_from("<L", data, 140)
    start = 144 + group_length
    meta: dict = {}
    _scan(data, False, True, meta, 144, start)
    syntax_element = meta.get(0x00020010)
    if syntax_element is None:
        raise ValueError("no TransferSyntaxUID in the file meta")
    syntax = syntax_element.value.decode("ascii").strip("\x00 ")
    elements: dict = {}
    _scan(data, syntax == IMPLICIT_LE, syntax != EXPLICIT_BE, elements, start)
    ds = Dataset(elements)
    ds.set_original_encoding(syntax == IMPLICIT_LE, syntax != EXPLICIT_BE)
    return ds


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text_bytes(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _scan(data: bytes | memoryview, implicit: bool, little: bool, collect: dict | None = None,
          pos: int = 0, size: int | None = None) -> tuple[list[tuple[int, int]], dict[str, str]]:
    """Walk top-level elements: ([(start, end) byte ranges to keep], {wanted name: value}).

    collect: when given, every top-level standard element (even group) is added to it as a
    pydicom RawDataElement.
    """
    endian = "<" if little else ">"
    tag_fmt = struct.Struct(endian + "HH")
    u32 = struct.Struct(endian + "L")
    # One unpack per element: tag, then VR + 16-bit length (explicit) or 32-bit length (implicit)
    head = struct.Struct(endian + ("HHL" if implicit else "HH2sH"))
    size = len(data) if size is None else size
    values: dict[str, str] = {}
    ranges: list[tuple[int, int]] = []
    keep_from = pos
    new = tuple.__new__  # RawDataElement without its keyword-default wrapper (this loop is hot)
    while pos < size:
        if pos + 8 > size:
            raise ValueError(f"element header cut short at byte {pos}")
        if implicit:
            group, elem, length = head.unpack_from(data, pos)
            start, vr = pos + 8, b""
        else:
            group, elem, vr, length = head.unpack_from(data, pos)
            start = pos + 8
            if vr in _LONG_VRS:
                if pos + 12 > size:
                    raise ValueError(f"element ({group:04X},{elem:04X}) header cut short")
                (length,) = u32.unpack_from(data, start)
                start = pos + 12
        tag = group << 16 | elem
        if tag >= _BULK_GROUP:
            # Not kept, but it must be whole: an instance cut in its pixel data is not stored.
            if length == _UNDEFINED:
                _skip_sequence(data, start, implicit, tag_fmt, u32)
            elif start + length > size:
                raise ValueError(f"element ({group:04X},{elem:04X}) declares {length} bytes, {size - start} remain")
            break
        if length == _UNDEFINED:
            # A sequence (or UN of undefined length, whose content is implicit VR little endian)
            if vr == b"UN":
                end = _skip_sequence(data, start, True, struct.Struct("<HH"), struct.Struct("<L"))
            else:
                end = _skip_sequence(data, start, implicit, tag_fmt, u32)
            if collect is not None and not group & 1:  # pydicom reads the items back; delimiter left out
                value = bytes(data[start:end - 8])
                collect[tag] = new(RawDataElement, (BaseTag(tag), "SQ" if vr in (b"SQ", b"UN") else None,
                                                    len(value), value, start, implicit or vr == b"UN",
                                                    little or vr == b"UN", True, True))
        else:
            end = start + length
            if end > size:
                raise ValueError(f"element ({group:04X},{elem:04X}) declares {length} bytes, "
                                 f"{size - start} remain")
            if tag in _WANTED:
                values[_WANTED[tag]] = bytes(data[start:end]).decode("ascii", "replace").strip("\x00 ")
            if collect is not None and not group & 1:  # private elements: the mapping never reads them
                collect[tag] = new(RawDataElement, (BaseTag(tag), _VR_NAMES.get(vr) if vr else None, length,
                                                    data[start:end], start, implicit, little, True, False))
        if end - pos > BULK_THRESHOLD:
            ranges.append((keep_from, pos))
            keep_from = end
        pos = end
    ranges.append((keep_from, pos))
    return [r for r in ranges if r[1] > r[0]] or [(0, 0)], values


def _skip_sequence(data, pos: int, implicit: bool, tag_fmt: struct.Struct, u32: struct.Struct) -> int:
    """Position after an undefined-length sequence (or encapsulated fragments) starting at pos."""
    size = len(data)
    while True:
        if pos + 8 > size:
            raise ValueError("sequence ends without a delimiter")
        group, elem = tag_fmt.unpack_from(data, pos)
        (length,) = u32.unpack_from(data, pos + 4)
        tag = group << 16 | elem
        if tag == _SEQUENCE_END:
            return pos + 8
        if tag != _ITEM:
            raise ValueError(f"unexpected tag ({group:04X},{elem:04X}) in a sequence")
        if length == _UNDEFINED:
            pos = _skip_item(data, pos + 8, implicit, tag_fmt, u32)
        else:
            pos += 8 + length
            if pos > size:
                raise ValueError("a sequence item extends past the end of the data set")


def _skip_item(data, pos: int, implicit: bool, tag_fmt: struct.Struct, u32: struct.Struct) -> int:
    """Position after an undefined-length item's elements and its delimiter."""
    size = len(data)
    u16 = struct.Struct(u32.format[0] + "H")
    while True:
        if pos + 8 > size:
            raise ValueError("item ends without a delimiter")
        group, elem = tag_fmt.unpack_from(data, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return pos + 8
        vr = b""
        if implicit:
            (length,) = u32.unpack_from(data, pos + 4)
            start = pos + 8
        else:
            vr = bytes(data[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                (length,) = u32.unpack_from(data, pos + 8)
                start = pos + 12
            else:
                (length,) = u16.unpack_from(data, pos + 6)
                start = pos + 8
        if length == _UNDEFINED:
            if vr == b"UN":
                pos = _skip_sequence(data, start, True, struct.Struct("<HH"), struct.Struct("<L"))
            else:
                pos = _skip_sequence(data, start, implicit, tag_fmt, u32)
        else:
            pos = start + length
            if pos > size:
                raise ValueError(f"element ({group:04X},{elem:04X}) in a sequence extends past the end")
