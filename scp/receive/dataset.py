"""A received C-STORE data set, read just enough to spool it (the per-instance hot path).

pynetdicom hands the handler the raw data set bytes. Decoding them with pydicom costs
about 1 ms per instance, as much as the whole network exchange, so this module walks
the top-level elements itself: it collects the four UIDs the node needs, checks the
element structure is complete, and finds where bulk data starts. Values are never
decoded otherwise; pixel data is never touched.

The spooled header is every top-level element before group 7FE0 (Pixel Data, Float
and Double Float Pixel Data, Extended Offset Table), minus other top-level elements
longer than BULK_THRESHOLD (overlay data, encapsulated documents, large private blobs),
which the mapping never needs. Deflated data sets are inflated in pieces only as far as
their pixel data, and spooled as Explicit VR Little Endian (deflate's inner encoding), so
every spool file reads without zlib.

Memory is bounded by design: a data set arrives into an `IncomingDataSet`, in memory up
to SPILL_THRESHOLD and past it in a temporary file (read back through mmap: only the
header's pages are touched); the spooled header is capped at max_header bytes (node.max_header_bytes),
inflated or not, and an instance whose header would be larger is refused with 0xC000.
"""

from __future__ import annotations

import mmap
import os
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scp.dicom.elements import PIXEL_DATA_GROUP, CutShort, element_head, encoding, top_level, value_end
from scp.errors import DicomFhirError
from scp.receive.status import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH
from scp.store.layout import is_safe_uid
from scp.store.part10 import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, file_meta

BULK_THRESHOLD = 64 * 1024
MAX_HEADER = 16 * 2**20  # node.max_header_bytes' default
SPILL_THRESHOLD = 2 * 2**20  # a data set larger than this goes to a temporary file as it arrives
INFLATE_PIECE = 1 << 20  # inflated bytes per step: what a deflate bomb gets before it is refused

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


def parse_received(data: bytes | memoryview, transfer_syntax: str, max_header: int = MAX_HEADER
                   ) -> ReceivedInstance:
    """UIDs and header bytes of a received data set; BadInstance when it cannot be spooled.

    max_header: the largest header (bytes before pixel data, inflated) accepted; beyond it 0xC000.
    """
    header_syntax = transfer_syntax
    plain = data
    if transfer_syntax == DEFLATED_LE:
        plain = inflate_header(data, max_header)
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
    kept = sum(end - start for start, end in ranges)
    if kept > max_header:
        raise BadInstance(CANNOT_UNDERSTAND, f"its header ({kept} bytes before pixel data) is larger than "
                                             f"node.max_header_bytes ({max_header})")
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


def inflate_header(data: bytes | memoryview, max_header: int) -> bytearray:
    """The inflated bytes of a deflated data set up to its pixel data (all of it when it has none).

    Inflated a piece at a time (INFLATE_PIECE), walking the elements as they become whole, and
    stopped at the first element of group 7FE0: the pixel data is never inflated. More than
    max_header bytes before it (a deflate bomb: a few MB inflating to GBs) is refused with 0xC000,
    having cost at most max_header + INFLATE_PIECE bytes.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    plain = bytearray()
    enc = None
    pos = offset = 0  # pos: the first element not yet known whole; offset: compressed bytes fed
    total = len(data)
    while True:
        if enc is None and len(plain) >= 6:
            # Some archives encode implicit VR although the context says explicit: walk it as it is.
            enc = encoding(not bytes(plain[4:6]).isalpha(), True)
        size = len(plain)
        try:
            while enc is not None and pos < size:
                tag, vr, length, start = element_head(plain, pos, size, enc)
                if tag >= PIXEL_DATA_GROUP:
                    del plain[pos:]
                    return plain
                pos = value_end(plain, tag, vr, length, start, size, enc)
        except CutShort:
            pass
        except (struct.error, ValueError, RecursionError) as exc:
            raise BadInstance(CANNOT_UNDERSTAND, f"deflated data set cannot be parsed ({exc})") from exc
        if inflater.eof or (offset >= total and not inflater.unconsumed_tail):
            if pos == len(plain) and enc is not None:
                return plain  # no pixel data: the whole data set is the header
            raise BadInstance(CANNOT_UNDERSTAND, f"deflated data set cut short (element at inflated byte {pos})")
        if len(plain) > max_header:
            raise BadInstance(CANNOT_UNDERSTAND, f"deflated data set inflates to more than node.max_header_bytes "
                                                 f"({max_header}) before its pixel data (a deflate bomb?)")
        if inflater.unconsumed_tail:
            piece = inflater.unconsumed_tail
        else:
            piece = bytes(data[offset:offset + 65536])
            offset += len(piece)
        try:
            plain += inflater.decompress(piece, INFLATE_PIECE)
        except zlib.error as exc:
            raise BadInstance(CANNOT_UNDERSTAND, f"deflated data set cannot be inflated ({exc})") from exc


class IncomingDataSet:
    """One C-STORE data set as its P-DATA fragments arrive (written to by pynetdicom's DUL thread).

    In memory up to `threshold` bytes; past it `meta()` (the file meta) and everything so far go to a
    temporary file in `folder` (on the spool's or the archive's file system, so the archive can take
    the file by rename), and the rest is written straight to it. A write error (disk full) is kept
    in `error` instead of raised: pynetdicom's reader must go on, the handler answers 0xA700.
    """

    def __init__(self, folder: Path, meta: Callable[[], bytes], threshold: int = SPILL_THRESHOLD) -> None:
        self.folder = folder
        self.meta = meta  # the file meta to start the file with, built only when it spills
        self.prefix = b""
        self.threshold = threshold
        self.buffer: bytearray | None = bytearray()
        self.path: Path | None = None
        self.size = 0
        self.error: OSError | None = None
        self._fd: int | None = None

    @property
    def spilled(self) -> bool:
        return self.path is not None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.error is not None:
            return
        try:
            if self._fd is not None:
                _write_all(self._fd, data)
                return
            assert self.buffer is not None
            self.buffer += data
            if len(self.buffer) > self.threshold:
                self._spill()
        except OSError as exc:
            self.error = exc
            self.buffer = None

    def _spill(self) -> None:
        # The receiving process's PID first: the coordinator removes what a killed receive worker left
        path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._fd, self.path = fd, path
        self.prefix = self.meta()
        _write_all(fd, self.prefix)
        assert self.buffer is not None
        _write_all(fd, self.buffer)
        self.buffer = None

    def map(self) -> tuple[mmap.mmap, memoryview]:
        """The spilled data set read-only through mmap (pages read only when touched): (map, view of the
        data set). The caller releases the view, then closes the map."""
        assert self._fd is not None
        mapped = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        if hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_RANDOM)  # no read-ahead: the header walk touches a few pages
        return mapped, memoryview(mapped)[len(self.prefix):]

    def chunks(self, piece: int = 1 << 20) -> Iterator[bytes]:
        """The spilled data set (without the prefix) read in pieces: a copy costs no memory."""
        assert self._fd is not None
        offset, end = len(self.prefix), os.fstat(self._fd).st_size
        while offset < end:
            data = os.pread(self._fd, min(piece, end - offset), offset)
            if not data:
                raise OSError(f"{self.path}: ended at byte {offset} of {end}")
            offset += len(data)
            yield data

    def make_durable(self) -> None:
        """fsync the temporary file (before it is renamed into the archive)."""
        assert self._fd is not None
        os.fsync(self._fd)

    def detach(self) -> None:
        """The file was renamed away (the archive took it): close, but remove nothing."""
        self.path = None
        self.discard()

    def discard(self) -> None:
        """Free the data set: close and remove the temporary file, if any."""
        self.buffer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def clear_incoming(folder: Path, pid: int | None = None) -> int:
    """Remove the temporary data set files a killed node left (none was acknowledged): all of them at
    start, or those of one ended receive worker (`pid`) while the others go on receiving."""
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.endswith(".tmp") and (pid is None or name.startswith(f"{pid}-")):
            (folder / name).unlink(missing_ok=True)
            removed += 1
    if pid is None:
        try:
            folder.rmdir()  # made again by the next large data set; gone, the spool looks as the node left it
        except OSError:
            pass
    return removed


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
