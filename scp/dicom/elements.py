"""The one walker of DICOM data elements (PS3.5 7.1 data elements, 7.5 sequences, A.4 fragments).

Three parts of the node read DICOM bytes without pydicom, for speed or to avoid
reading bulk data: the receiver (the UIDs of a C-STORE data set and where its bulk
data starts), the spool reader (a spool file as raw elements) and the folder
converter (is a file's Pixel Data whole?). They share this walker, so the rules for
explicit/implicit VR, 32-bit lengths, undefined lengths, items and delimiters live in
one place.

Positions are byte offsets into `data`, anything that supports the buffer protocol
(bytes, memoryview, mmap): nothing is copied, and a value is never read unless the
caller slices it. Errors are ValueError subclasses: `CutShort` when the bytes end
before the element does (a truncated file or transfer), `Malformed` when the bytes
cannot be DICOM (an unexpected tag where an item must be).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from typing import Any

# VRs with a 2-byte reserved field and a 32-bit length in explicit VR (PS3.5 Table 7.1-1)
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_GROUP = 0x7FE00000  # group 7FE0 and above: pixel data and what follows it


class CutShort(ValueError):
    """The bytes end before the element (or its sequence, or its fragments) does."""


class Malformed(ValueError):
    """The bytes are not DICOM where the structure says they must be."""


class Encoding:
    """A transfer syntax's element encoding, with its structs compiled once (use `encoding()`)."""

    __slots__ = ("implicit", "little", "tag", "tag_length", "head", "u32")

    def __init__(self, implicit: bool, little: bool) -> None:
        endian = "<" if little else ">"
        self.implicit = implicit
        self.little = little
        self.tag = struct.Struct(endian + "HH")
        self.tag_length = struct.Struct(endian + "HHL")
        # One unpack per element: tag, then VR + 16-bit length (explicit) or 32-bit length (implicit)
        self.head = struct.Struct(endian + ("HHL" if implicit else "HH2sH"))
        self.u32 = struct.Struct(endian + "L")

    def __repr__(self) -> str:
        return f"Encoding(implicit={self.implicit}, little={self.little})"


@functools.cache
def encoding(implicit: bool, little: bool) -> Encoding:
    return Encoding(implicit, little)


# The content of a UN element of undefined length is always implicit VR little endian (PS3.5 6.2.2).
UN_CONTENT = encoding(True, True)


def element_head(data: Any, pos: int, size: int, enc: Encoding) -> tuple[int, bytes, int, int]:
    """(tag, VR — b"" in implicit VR —, value length, value start) of the element at pos."""
    if pos + 8 > size:
        raise CutShort(f"element header cut short at byte {pos}")
    if enc.implicit:
        group, elem, length = enc.head.unpack_from(data, pos)
        return group << 16 | elem, b"", length, pos + 8
    group, elem, vr, length = enc.head.unpack_from(data, pos)
    if vr in LONG_VRS:
        if pos + 12 > size:
            raise CutShort(f"element ({group:04X},{elem:04X}) header cut short")
        (length,) = enc.u32.unpack_from(data, pos + 8)
        return group << 16 | elem, vr, length, pos + 12
    return group << 16 | elem, vr, length, pos + 8


def value_end(data: Any, tag: int, vr: bytes, length: int, start: int, size: int, enc: Encoding) -> int:
    """Position after the element's value; an undefined length is walked to its delimiter."""
    if length == UNDEFINED_LENGTH:
        return skip_items(data, start, size, UN_CONTENT if vr == b"UN" else enc)
    end = start + length
    if end > size:
        raise CutShort(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes, "
                       f"{size - start} remain")
    return end


def skip_items(data: Any, pos: int, size: int, enc: Encoding) -> int:
    """Position after the sequence delimiter of the items (or Pixel Data fragments) starting at pos."""
    while True:
        if pos + 8 > size:
            raise CutShort("a sequence (or encapsulated Pixel Data) ends without its delimiter")
        group, elem, length = enc.tag_length.unpack_from(data, pos)
        tag = group << 16 | elem
        if tag == SEQUENCE_DELIMITER:
            return pos + 8
        if tag != ITEM:
            raise Malformed(f"unexpected tag ({group:04X},{elem:04X}) where a sequence item must be")
        if length == UNDEFINED_LENGTH:
            pos = _skip_item_elements(data, pos + 8, size, enc)
        else:
            pos += 8 + length
            if pos > size:
                raise CutShort("a sequence item (or Pixel Data fragment) extends past the end")


def _skip_item_elements(data: Any, pos: int, size: int, enc: Encoding) -> int:
    """Position after an undefined-length item's elements and its item delimiter."""
    while True:
        if pos + 8 > size:
            raise CutShort("a sequence item ends without its delimiter")
        group, elem = enc.tag.unpack_from(data, pos)
        if group << 16 | elem == ITEM_DELIMITER:
            return pos + 8
        tag, vr, length, start = element_head(data, pos, size, enc)
        pos = value_end(data, tag, vr, length, start, size, enc)


def top_level(data: Any, enc: Encoding, pos: int = 0, size: int | None = None
              ) -> Iterator[tuple[int, bytes, int, int, int]]:
    """(tag, VR, length, value start, value end) of each top-level element from pos to size.

    Every element is checked to be whole before it is yielded, sequences included; the
    caller may stop at any element (the receiver stops at Pixel Data).
    """
    # The receiver's hot path (~100 elements per instance): element_head and value_end
    # inlined for the common case, with the structs bound to locals.
    size = len(data) if size is None else size
    unpack_head, unpack_u32, implicit = enc.head.unpack_from, enc.u32.unpack_from, enc.implicit
    while pos < size:
        if pos + 8 > size:
            raise CutShort(f"element header cut short at byte {pos}")
        if implicit:
            group, elem, length = unpack_head(data, pos)
            vr, start = b"", pos + 8
        else:
            group, elem, vr, length = unpack_head(data, pos)
            if vr in LONG_VRS:
                if pos + 12 > size:
                    raise CutShort(f"element ({group:04X},{elem:04X}) header cut short")
                (length,) = unpack_u32(data, pos + 8)
                start = pos + 12
            else:
                start = pos + 8
        tag = group << 16 | elem
        if length == UNDEFINED_LENGTH:
            end = skip_items(data, start, size, UN_CONTENT if vr == b"UN" else enc)
        else:
            end = start + length
            if end > size:
                raise CutShort(f"element ({group:04X},{elem:04X}) declares {length} bytes, {size - start} remain")
        yield tag, vr, length, start, end
        pos = end
