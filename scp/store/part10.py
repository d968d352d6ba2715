"""The spool file format: header-only DICOM Part 10 files (PS3.10 7.1), written and read here.

A spool file is the 128-byte preamble, "DICM", the File Meta Information group
(Explicit VR Little Endian) and the instance's data set up to its bulk data, in
the transfer syntax named by the file meta (deflated data sets are spooled inflated,
as Explicit VR Little Endian). The file meta's Source Application Entity Title
(0002,0016) records the calling AE title. Archive files (node.archive_dir) have the
same file meta before the complete data set as received.

The file meta also records who sent the instance: Source Application Entity Title
(0002,0016), the calling AE title, and Source Presentation Address (0002,0026), the
peer's address as a DICOM URI ("dicom://10.0.5.21:40001", "dicom://[2001:db8::1]:40001").
Files of versions before it have no (0002,0026); `source_of` reads them with address "".

Writing: `file_meta` (the bytes before the data set). Reading: `source_of` (the sender,
from the file meta only: the first few hundred bytes), `header_dataset`, a
pydicom Dataset of raw, unconverted elements — much cheaper than pydicom.dcmread, since
pydicom converts an element only when it is read and the mapping reads a few dozen.
"""

from __future__ import annotations

import struct
from typing import Any
from urllib.parse import urlsplit

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

from scp.dicom.elements import LONG_VRS, PIXEL_DATA_GROUP, UNDEFINED_LENGTH, encoding, top_level

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

# Under pydicom's UID root, derived from the name (stable): identifies the writer of spool files.
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["dicom-fhir-scp"])
IMPLEMENTATION_VERSION = "DICOMFHIRSCP_01"

_PREAMBLE = 128
_META_START = 144  # preamble, "DICM", the group length element (12 bytes)
_TRANSFER_SYNTAX = 0x00020010
_SOURCE_AE = 0x00020016
_SOURCE_ADDRESS = 0x00020026
SOURCE_URI_SCHEME = "dicom"
META_PROBE = 1024  # bytes that hold the file meta of any spool file this module writes (at most about 500)
_VR_NAMES = {vr.encode(): vr for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW",
    "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV")}


def file_meta(sop_class_uid: str, sop_uid: str, transfer_syntax: str, source_ae: str = "",
              source_address: str = "") -> bytes:
    """Preamble, DICM prefix and File Meta Information group for a Part 10 file.

    source_address: the peer's Source Presentation Address (a URI, see `presentation_address`);
    "" leaves (0002,0026) out, as files of earlier versions have it.
    """
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
    if source_address:
        body += _element(0x0002, 0x0026, b"UR", _text_bytes(source_address))
    return b"\x00" * _PREAMBLE + b"DICM" + _element(0x0002, 0x0000, b"UL", struct.pack("<L", len(body))) + body


def presentation_address(host: str, port: int | None = None) -> str:
    """The Source Presentation Address of a peer: a DICOM URI (PS3.10 7.1: (0002,0026) is a URI),
    "dicom://host:port", IPv6 hosts in brackets; "" when the host is unknown."""
    host = host.strip()
    if not host:
        return ""
    if ":" in host:  # an IPv6 address (a zone index "%eth0" is URI-escaped as RFC 6874 says)
        host = f"[{host.replace('%', '%25')}]"
    return f"{SOURCE_URI_SCHEME}://{host}" + (f":{port}" if port else "")


def address_host(address: str) -> str:
    """The IP address (or host) of a Source Presentation Address; a bare address is taken as it is."""
    address = address.strip()
    if "://" not in address:
        return address
    try:
        host = urlsplit(address).hostname or ""
    except ValueError:  # a malformed URI written by someone else: keep what it says
        return address
    return host.replace("%25", "%")


def source_of(data: bytes) -> tuple[str, str]:
    """(calling AE title, peer IP address) recorded in a Part 10 file's meta; "" for what it does not
    record (files of earlier versions have no (0002,0026)). Reads the file meta only: `data` may be the
    file's first META_PROBE bytes. ValueError when it is not a Part 10 file or the meta is cut short."""
    if len(data) < _META_START or data[_PREAMBLE:_PREAMBLE + 4] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a Part 10 file (no DICM prefix and group length)")
    (group_length,) = struct.unpack_from("<L", data, 140)
    end = _META_START + group_length
    if len(data) < end:
        raise ValueError(f"the file meta ends at byte {end}, {len(data)} given")
    meta = raw_elements(data, implicit=False, little=True, pos=_META_START, size=end)
    return _text(meta.get(_SOURCE_AE)), address_host(_text(meta.get(_SOURCE_ADDRESS)))


def read_source(path: Any) -> tuple[str, str]:
    """`source_of` a file on disk, reading only its first bytes (the `status` command: no data set)."""
    with open(path, "rb") as fh:
        data = fh.read(META_PROBE)
        if len(data) >= _META_START:
            (group_length,) = struct.unpack_from("<L", data, 140)
            if _META_START + group_length > len(data) and group_length < 1 << 16:  # a larger meta of another writer
                data += fh.read(_META_START + group_length - len(data))
    return source_of(data)


def header_dataset(data: bytes, wanted: frozenset[int] | None = None) -> Dataset:
    """A spool file as a pydicom Dataset of raw, unconverted elements (private elements left out;
    only the `wanted` tags when given: the delivery passes mapping.header.HEADER_TAGS).

    ValueError when the file is not one this module wrote (the caller falls back to pydicom).
    """
    if len(data) < _META_START or data[_PREAMBLE:_PREAMBLE + 4] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a spool file (no DICM prefix and group length)")
    (group_length,) = struct.unpack_from("<L", data, 140)
    start = _META_START + group_length
    meta = raw_elements(data, implicit=False, little=True, pos=_META_START, size=start)
    syntax_element = meta.get(_TRANSFER_SYNTAX)
    if syntax_element is None:
        raise ValueError("no TransferSyntaxUID in the file meta")
    syntax = syntax_element.value.decode("ascii").strip("\x00 ")
    implicit, little = syntax == IMPLICIT_LE, syntax != EXPLICIT_BE
    ds = Dataset(raw_elements(data, implicit=implicit, little=little, pos=start, wanted=wanted))
    ds.set_original_encoding(implicit, little)
    return ds


def raw_elements(data: Any, *, implicit: bool, little: bool, pos: int = 0, size: int | None = None,
                 wanted: frozenset[int] | None = None) -> dict[BaseTag, RawDataElement]:
    """The top-level standard elements (even groups) before bulk data, as pydicom RawDataElements
    (of those, only the `wanted` tags when given)."""
    enc = encoding(implicit, little)
    elements: dict[BaseTag, RawDataElement] = {}
    new = tuple.__new__  # RawDataElement without its keyword-default wrapper (this loop is hot)
    for tag, vr, length, start, end in top_level(data, enc, pos, size):
        if tag >= PIXEL_DATA_GROUP:
            break
        if tag >> 16 & 1 or (wanted is not None and tag not in wanted):  # private: the mapping never reads them
            continue
        if length == UNDEFINED_LENGTH:
            # A sequence (or UN of undefined length, implicit VR little endian inside): pydicom
            # reads the items back from the value; the sequence delimiter is left out.
            un = vr == b"UN"
            value = bytes(data[start:end - 8])
            elements[tag] = new(RawDataElement, (BaseTag(tag), "SQ" if un or vr == b"SQ" else None, len(value),
                                                 value, start, implicit or un, little or un, True, True))
        else:
            elements[tag] = new(RawDataElement, (BaseTag(tag), _VR_NAMES.get(vr) if vr else None, length,
                                                 data[start:end], start, implicit, little, True, False))
    return elements


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _text(element: RawDataElement | None) -> str:
    return "" if element is None else bytes(element.value).decode("ascii", "replace").strip("\x00 ")


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text_bytes(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw
