"""A file's header cut down to the elements the mapping reads, parsed by pydicom (convert's fast path).

pydicom.dcmread walks every element of a header in Python (a CT header: about 250
elements, most of a conversion's time); the mapping reads about 40 of them. Here the
project's element walker (scp.dicom.elements) finds each element's extent without
decoding anything, and pydicom's own reader (filereader.read_dataset, as dcmread calls it)
parses copies, byte for byte and in file order, of:

- the File Meta Information,
- the data set's first element (pydicom checks the explicit/implicit VR on it),
- the wanted top-level elements,
- every sequence of undefined length (pydicom, not the walker, decides where it ends;
  the parsed tag set must be the one copied, which proves the two agree).

So the values the mapping reads, their conversion and pydicom's warnings about them
are those of the whole file: the same pydicom code reads the same bytes.

Whatever pydicom might read differently from the walker gives None, and the caller
reads the file with pydicom as before (the reasons a file is skipped stay pydicom's):
no DICM prefix; a deflated, missing or unusual transfer syntax; command elements; a VR
pydicom does not know; tags out of order; an undefined length that is not a sequence;
anything the walker finds cut short or malformed (a truncated file: the reason and its
detail are pydicom's and folder's, as before); a parse that disagrees.
Warnings and pydicom's log records of a parse that is given up are dropped, so a file
falling back is reported once; a File Meta Information pydicom warns about is left to
dcmread too.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import mmap
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR

from scp.dicom.elements import UNDEFINED_LENGTH, CutShort, Malformed, encoding, top_level


_PREFIX_END = 132  # 128-byte preamble and "DICM"
_TRANSFER_SYNTAX = 0x00020010
_FIRST_DATA_SET_TAG = 0x00030000  # group 0000 (a command set) and 0002 (file meta) come before
_ITEM_GROUP = 0xFFFE0000  # items and delimiters: pydicom ends a data set at an item delimiter
# pydicom's stop_before_pixels: the three Pixel Data elements (filereader._at_pixel_data)
_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_KNOWN_VRS = frozenset(vr.encode("ascii") for vr in VR)  # an element with another VR: pydicom may guess
_UPPER = range(0x41, 0x5B)  # pydicom's test of an explicit VR's two bytes (filereader._is_implicit_vr)


@dataclass(frozen=True)
class Reduced:
    """The bytes pydicom parses instead of the file, and what the parse must give."""

    meta: bytes  # the File Meta Information elements (after the preamble and "DICM")
    data_set: bytes  # the data set elements copied, in file order
    tags: frozenset[int]  # their tags
    implicit: bool
    little: bool


def read_reduced(fp: BinaryIO, wanted: frozenset[int]) -> Dataset | None:
    """The file's header as pydicom reads it, holding only the elements above; None: read the whole file.

    fp: the file, opened binary. The Dataset has the file_meta and original_encoding
    pydicom.dcmread(stop_before_pixels=True) gives, and of the data set elements the wanted ones
    (and those the module docstring lists).
    """
    try:
        size = os.fstat(fp.fileno()).st_size
        if size < _PREFIX_END:
            return None
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as data:
            reduced = reduce(data, size, wanted)
    except (OSError, ValueError):  # mmap refuses some files (a pipe, a special file): pydicom reads them
        return None
    return None if reduced is None else parse(reduced)


def reduce(data: Any, size: int, wanted: frozenset[int]) -> Reduced | None:
    """The elements pydicom parses (see the module docstring); None when the cut cannot be trusted."""
    if data[128:_PREFIX_END] != b"DICM":
        return None
    try:
        meta_end, syntax = _file_meta(data, size)
        if syntax is None:
            return None
        implicit, little = syntax
        return _data_set(data, size, meta_end, encoding(implicit, little), wanted)
    except (CutShort, Malformed):
        return None


def parse(reduced: Reduced) -> Dataset | None:
    """pydicom's Dataset of the reduced elements; None (nothing reported) when pydicom reads them otherwise.

    What dcmread does, less what cannot matter here (the preamble, a command set, the
    transfer syntax's choice: all checked while cutting), with pydicom's own functions, so
    that the elements are the same RawDataElements and the character set is decoded as
    often (each time may warn). A file meta pydicom warns about is left to dcmread
    (_quiet_meta_element).
    """
    mode = pydicom.config.settings.reading_validation_mode
    if not all(_quiet_meta_element(element, mode) for element in _elements(reduced.meta)):
        return None
    with _held_back() as (caught, records):
        try:
            meta = FileMetaDataset(read_dataset(io.BytesIO(reduced.meta), False, True))
            meta.set_original_encoding(False, True, default_encoding)
            ds = read_dataset(io.BytesIO(reduced.data_set), reduced.implicit, reduced.little)
            # dcmread decodes the character set a second time (FileDataset's original encoding)
            charset = ds.get(0x00080005)
            ds.set_original_encoding(reduced.implicit, reduced.little,
                                     convert_encodings(charset.value) if charset else default_encoding)
        except Exception:  # strict validation, or a structure the walker saw otherwise: dcmread's call
            return None
        if ds.original_encoding != (reduced.implicit, reduced.little) or set(ds.keys()) != reduced.tags:
            return None
    ds.file_meta = meta
    for record in records:  # what pydicom would have logged reading the file itself
        logging.getLogger(record.name).handle(record)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return ds


def _elements(data: bytes) -> Iterator[bytes]:
    """Each explicit VR little endian element of data, whole (the file meta, already walked once)."""
    pos = 0
    for _tag, _vr, _length, _start, end in top_level(data, encoding(False, True)):
        yield data[pos:end]
        pos = end


# A memo of a pure function, not state: the File Meta elements of a folder's files are the same
# bytes but for the SOP Instance UID, and converting them is a third of a cut file's parse.
@functools.lru_cache(maxsize=64)
def _quiet_meta_element(element: bytes, validation_mode: int) -> bool:
    """pydicom converts this File Meta element (its bytes, header included) without a warning or a log
    record, under this reading_validation_mode. dcmread converts some of them (which ones is its
    business): a file with any other is left to dcmread, which reports what it finds."""
    with _held_back() as (caught, records):
        try:
            meta = read_dataset(io.BytesIO(element), False, True)
            for tag in list(meta.keys()):
                meta[tag]  # converted (and validated) here
        except Exception:
            return False
    return not caught and not records


@contextlib.contextmanager
def _held_back() -> Iterator[tuple[list[warnings.WarningMessage], list[logging.LogRecord]]]:
    """The warnings and pydicom log records made inside, kept from being shown (the caller replays them)."""
    pydicom_log = logging.getLogger("pydicom")
    records: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        records.append(record)
        return False

    pydicom_log.addFilter(hold)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught, records
    finally:
        pydicom_log.removeFilter(hold)


def _file_meta(data: Any, size: int) -> tuple[int, tuple[bool, bool] | None]:
    """(where the data set starts, (implicit, little) of its transfer syntax, or None: let pydicom read it)."""
    enc = encoding(False, True)  # the file meta is explicit VR little endian
    syntax: tuple[bool, bool] | None = None
    end = _PREFIX_END
    for tag, vr, length, start, value_end in top_level(data, enc, _PREFIX_END, size):
        if tag >> 16 != 0x0002:
            break
        if vr not in _KNOWN_VRS or length == UNDEFINED_LENGTH:
            return end, None
        if tag == _TRANSFER_SYNTAX:
            syntax = _encoding_of(bytes(data[start:value_end]))
        end = value_end
    return end, syntax


def _encoding_of(value: bytes) -> tuple[bool, bool] | None:
    """(implicit, little) as pydicom derives it from the TransferSyntaxUID; None when pydicom does more."""
    uid = value.decode("ascii", "replace").rstrip("\0 ")
    if uid == ImplicitVRLittleEndian:
        return True, True
    if uid == ExplicitVRBigEndian:
        return False, False
    if uid == DeflatedExplicitVRLittleEndian or uid in pydicom.uid.PrivateTransferSyntaxes:
        return None
    if not uid or "\\" in uid:
        return None
    return False, True  # explicit VR little endian, and every compressed syntax


def _data_set(data: Any, size: int, pos: int, enc: Any, wanted: frozenset[int]) -> Reduced | None:
    meta = bytes(data[_PREFIX_END:pos])
    parts: list[bytes] = []
    tags: set[int] = set()
    previous = -1
    for tag, vr, length, start, end in top_level(data, enc, pos, size):
        if tag in _PIXEL_DATA:
            # top_level yields an element only when it is whole: the Pixel Data fits in the file.
            return Reduced(meta, b"".join(parts), frozenset(tags), enc.implicit, enc.little)
        if tag <= previous or tag < _FIRST_DATA_SET_TAG or tag >= _ITEM_GROUP:
            return None  # out of order, repeated, a command set, a delimiter: pydicom's own handling
        if previous < 0 and not _vr_check_passes(data, pos, enc):
            return None  # pydicom would switch the encoding (with a warning)
        if not enc.implicit and vr not in _KNOWN_VRS:
            return None
        undefined = length == UNDEFINED_LENGTH
        if undefined and not _sequence(tag, vr, enc.implicit):
            return None
        if previous < 0 or undefined or tag in wanted:
            parts.append(bytes(data[pos:end]))
            tags.add(tag)
        previous, pos = tag, end
    # No Pixel Data (a report, a presentation state): the walk reached the end of the file
    # with every element whole, as pydicom's check of the last element's length would find.
    return Reduced(meta, b"".join(parts), frozenset(tags), enc.implicit, enc.little)


def _vr_check_passes(data: Any, pos: int, enc: Any) -> bool:
    """pydicom takes the data set's encoding from the transfer syntax unless its first element says otherwise."""
    looks_explicit = data[pos + 4] in _UPPER and data[pos + 5] in _UPPER
    return looks_explicit != enc.implicit


def _sequence(tag: int, vr: bytes, implicit: bool) -> bool:
    """An undefined length pydicom reads as a sequence (not by searching for a delimiter)."""
    if not implicit:
        return vr in (b"SQ", b"UN")
    if tag >> 16 & 1:
        return True  # private: pydicom looks for an item, the walker has found items
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return True
