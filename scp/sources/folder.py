"""Convert a folder of DICOM files to FHIR, without the network.

The same mapping as the node (``mapping.convert_study``), fed from files instead
of C-STORE. Only headers are read (never pixel data); each file's dataset becomes
a slim ``mapping.InstanceHeader`` at once, so memory stays flat for large folders.
A file that cannot be used (not DICOM, truncated, missing UIDs, a DICOMDIR) is
skipped with its reason and the rest is converted: one bad file never aborts the
folder.

Library use::

    from scp.sources.folder import convert_folder, process_dicom_2_fhir
    report = convert_folder("/data/dicom", MappingOptions(timezone="Europe/Berlin"))
    for study_uid, resources in report.studies.items():
        ...  # resources.patient, .imaging_study, .endpoints: FHIR JSON dicts (mapping.StudyResources)
    study = process_dicom_2_fhir("/data/one-study")  # drop-in for dicom-fhir-converter's function
    study = process_dicom_2_fhir(datasets)           # ... and for PyPI dicom2fhir's (pydicom Datasets)

For datasets already in memory use ``mapping.convert_datasets``.
"""

from __future__ import annotations

import logging
import os
import mmap
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from fhir.resources.R4B.imagingstudy import ImagingStudy

from mapping import InstanceHeader, StudyResources, convert_datasets, convert_study, render
from mapping.errors import (ConfigurationError, DicomFhirError, MappingError, MultipleStudiesError,
                            PatientMismatchError)
from mapping.header import HEADER_TAGS
from mapping.options import MappingOptions
from scp.dicom.elements import CutShort, Malformed, element_head, encoding, value_end
from scp.sinks.disk import UnusableOutputError, write_study
from scp.sources.header_bytes import read_reduced
from scp.sources.parallel import emit_records, read_in_workers

log = logging.getLogger("scp.sources.folder")

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR

# Reasons a file is skipped; short and fixed so the summary can group by them.
NOT_DICOM = "not a DICOM file"
TRUNCATED = "truncated"
CORRUPT = "corrupt DICOM"
INCOMPLETE = "missing required attribute"
UNMAPPABLE = "cannot be mapped"
UNREADABLE = "cannot be opened"
DICOMDIR = "DICOMDIR (an index, not an instance)"

# Reasons a study is not converted or not written (report.rejected).
PATIENT_MISMATCH = "instances disagree on PatientID"
NOT_MAPPED = "cannot be mapped"
OUTPUT_OTHER_PATIENT = "output file holds another patient"
OUTPUT_UNREADABLE = "existing output file unreadable"



class UnusableFileError(DicomFhirError):
    """A file in the folder cannot be converted (it is skipped, the rest is not)."""

    def __init__(self, path: Path, reason: str, detail: str = "") -> None:
        self.path, self.reason, self.detail = Path(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str  # one of the fixed reasons above
    detail: str = ""


@dataclass
class ConversionReport:
    """What convert_folder found.

    studies: StudyInstanceUID -> converted resources (first-seen order).
    skipped: files that were not used, with the reason.
    rejected: StudyInstanceUID -> why the study was not converted or not written
        (for example its instances disagree on PatientID).
    written: StudyInstanceUID -> output file (only after write_studies).
    unchanged: studies whose output file already held exactly this content.
    """

    files_seen: int = 0
    duplicate_instances: int = 0  # files repeating an SOP Instance UID already read (last one wins)
    studies: dict[str, StudyResources] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)
    unchanged: set[str] = field(default_factory=set)

    @property
    def instances_read(self) -> int:
        """Files that were usable instances (every file seen is read or skipped)."""
        return self.files_seen - len(self.skipped)

    def skip_reasons(self) -> Counter[str]:
        return Counter(s.reason for s in self.skipped)

    def summary(self) -> list[str]:
        """Human-readable summary lines (no patient data)."""
        lines = [f"read {self.instances_read} instance(s) from {self.files_seen} file(s); "
                 f"{len(self.studies)} study(ies) converted"]
        if self.duplicate_instances:
            lines.append(f"{self.duplicate_instances} file(s) repeated an instance already read (the last one counts)")
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skip_reasons().most_common())
            lines.append(f"skipped {len(self.skipped)} file(s): {reasons}")
        if self.written or self.unchanged:
            lines.append(f"wrote {len(self.written) - len(self.unchanged)} study file(s), "
                         f"{len(self.unchanged)} already up to date")
        if self.rejected:
            reasons = Counter(self.rejected.values())
            lines.append(f"{len(self.rejected)} study(ies) NOT written: "
                         + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()))
        return lines


# --- finding and reading files --------------------------------------------------------------


def list_files(root: str | os.PathLike[str], *, exclude: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every regular file under root (recursively, sorted), or root itself when it is a file.

    exclude: a folder left out of the walk (the output folder, when it lies inside root).
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    skip = Path(exclude).resolve() if exclude is not None else None
    files: list[Path] = []
    _walk(root, skip, files)
    return files


def _walk(folder: Path, skip: Path | None, files: list[Path]) -> None:
    # scandir's cached entry types spare a stat per file (thousands of files per study).
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    subfolders = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subfolders.append(Path(entry.path))
        elif entry.is_file():
            files.append(Path(entry.path))
    for sub in subfolders:
        if skip is None or sub.resolve() != skip:
            _walk(sub, skip, files)


def read_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Read one file's header (stops before pixel data) and check the file is complete.

    Raises UnusableFileError with the reason when the file is not DICOM, is truncated,
    is a DICOMDIR or cannot be opened.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fp:
            ds = _parse(fp, path)
            if ds.file_meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
                raise UnusableFileError(path, DICOMDIR)
            _check_complete(fp, ds, path)
            return ds
    except OSError as exc:
        raise UnusableFileError(path, UNREADABLE, exc.strerror or str(exc)) from exc


def _read_instance(path: Path) -> InstanceHeader:
    """The InstanceHeader of one file; the Dataset is dropped here.

    pydicom's own warnings (an invalid value, a VR mismatch) are logged naming the file
    instead of printed bare by the warnings module: through logging they reach the log
    handler (routed around a progress bar), and the reader learns which file it was.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every file's own warnings, not only the first file's
        try:
            return _header_of(path)
        finally:
            for warning in caught:
                _log_pydicom_warning(path, warning)


def _log_pydicom_warning(path: Path, warning: warnings.WarningMessage) -> None:
    """One WARNING line naming the file; the text after the first ": " may quote a value (a name, an ID)."""
    text = str(warning.message)
    head, _, detail = text.partition(": ")
    log.warning("%s: %s: %s%s", path, warning.category.__name__, head, " (the value with -d)" if detail else "")
    if detail:
        log.debug("%s: %s", path, text)


def _header_of(path: Path) -> InstanceHeader:
    ds = _mapped_dataset(path)
    try:
        header = InstanceHeader.from_dataset(ds)
    except MappingError as exc:
        raise UnusableFileError(path, INCOMPLETE, str(exc)) from exc
    except Exception as exc:  # a malformed value pydicom trips over: skip this file, keep the folder
        # The message may quote a value (a name, an ID): only its type goes above DEBUG.
        log.debug("mapping %s failed", path, exc_info=True)
        raise UnusableFileError(path, UNMAPPABLE, f"{type(exc).__name__}; details with -d") from exc
    return header


def _mapped_dataset(path: Path) -> Dataset:
    """read_dataset holding only the elements the mapping reads, when header_bytes can cut the file
    down (several times faster: pydicom walks 40 elements, not 250); else read_dataset itself."""
    try:
        with open(path, "rb") as fp:
            ds = read_reduced(fp, HEADER_TAGS)
    except OSError:
        ds = None  # read_dataset reports it
    if ds is None:
        return read_dataset(path)
    if ds.file_meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
        raise UnusableFileError(path, DICOMDIR)
    return ds


def _parse(fp: BinaryIO, path: Path) -> Dataset:
    try:
        return pydicom.dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError as exc:
        # No preamble: accept a bare dataset (some old archives), but only when the file
        # starts like one; forcing every file would turn random bytes into "datasets".
        fp.seek(0)
        if fp.read(2) not in (b"\x08\x00", b"\x02\x00"):
            raise UnusableFileError(path, NOT_DICOM, "no DICM prefix") from exc
        fp.seek(0)
        try:
            return pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        except Exception as exc2:
            raise UnusableFileError(path, NOT_DICOM, f"{type(exc2).__name__}: {exc2}") from exc2
    except EOFError as exc:
        raise UnusableFileError(path, TRUNCATED, str(exc)) from exc
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types on garbage
        raise UnusableFileError(path, CORRUPT, f"{type(exc).__name__}: {exc}") from exc


def _check_complete(fp: BinaryIO, ds: Dataset, path: Path) -> None:
    """Detect files cut short (an interrupted copy) without reading pixel data.

    pydicom reads a short value silently; stop_before_pixels leaves fp at the Pixel Data
    element, whose declared length (or fragment items) must fit in the file. The file is
    mapped, not read: only the pages holding element and item headers are touched.
    """
    size = os.fstat(fp.fileno()).st_size
    position = fp.tell()
    if position > size:
        raise UnusableFileError(path, TRUNCATED, "an element extends past the end of the file")
    if position == size:
        last = ds.get_item(max(ds.keys())) if len(ds) else None
        value = getattr(last, "value", None)
        if isinstance(value, bytes) and len(value) < last.length:
            raise UnusableFileError(path, TRUNCATED, f"element {last.tag} is cut short")
        return  # a header-only object (no Pixel Data)
    implicit, little = ds.original_encoding
    enc = encoding(bool(implicit), little is not False)
    with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            tag, vr, length, start = element_head(data, position, size, enc)
            value_end(data, tag, vr, length, start, size, enc)
        except CutShort as exc:
            raise UnusableFileError(path, TRUNCATED, f"Pixel Data: {exc}") from None
        except Malformed as exc:
            raise UnusableFileError(path, CORRUPT, f"Pixel Data: {exc}") from None


# --- converting ---------------------------------------------------------------------------


def read_instances(files: Iterable[Path], report: ConversionReport,
                   progress: Callable[[Path], None] | None = None, *, jobs: int = 1) -> Iterator[InstanceHeader]:
    """Yield the header of each usable file; record the others in report.skipped.

    jobs > 1: headers are read in that many worker processes (scp.sources.parallel);
    the headers, the log lines and the report are the same as with one, in the same order.
    """
    if jobs < 1:
        raise ValueError(f"jobs: expected a positive number of processes, got {jobs!r}")
    files = list(files)
    if jobs == 1 or len(files) < 2:
        outcomes = ((path, (read_outcome(path), [])) for path in files)
    else:
        outcomes = read_in_workers(files, jobs, read_outcome)
    for path, (result, records) in outcomes:
        report.files_seen += 1
        try:
            emit_records(records)
            if isinstance(result, SkippedFile):
                report.skipped.append(result)
                if result.reason == DICOMDIR:
                    log.debug("skipped %s: %s", path, result.reason)
                else:
                    log.warning("skipped %s", UnusableFileError(result.path, result.reason, result.detail))
            else:
                yield result
        finally:
            if progress is not None:
                progress(path)


def read_outcome(path: Path) -> InstanceHeader | SkippedFile:
    """The InstanceHeader of one file, or why it is skipped (as data: it also comes back from a worker)."""
    try:
        return _read_instance(path)
    except UnusableFileError as exc:
        return SkippedFile(exc.path, exc.reason, exc.detail)


def convert_files(files: Iterable[Path], options: MappingOptions = MappingOptions(), *,
                  progress: Callable[[Path], None] | None = None, jobs: int = 1) -> ConversionReport:
    """Convert the given files, grouped by StudyInstanceUID (see convert_folder).

    jobs: processes reading headers (read_instances); the grouping and mapping stay here.
    """
    report = ConversionReport()
    by_study: dict[str, dict[str, InstanceHeader]] = {}
    for header in read_instances(files, report, progress, jobs=jobs):
        instances = by_study.setdefault(header.study_uid, {})
        if header.sop_instance_uid in instances:
            report.duplicate_instances += 1
        instances[header.sop_instance_uid] = header
    for study_uid, instances in by_study.items():
        try:
            resources = report.studies[study_uid] = convert_study(instances.values(), options)
        except PatientMismatchError as exc:
            # The exception text may hold patient IDs: keep it out of INFO/WARNING logs.
            log.warning("study %s not converted: its %d instance(s) disagree on PatientID",
                        study_uid, len(instances))
            log.debug("study %s: %s", study_uid, exc)
            report.rejected[study_uid] = PATIENT_MISMATCH
        except MappingError as exc:
            log.warning("study %s not converted: %s", study_uid, exc)
            report.rejected[study_uid] = NOT_MAPPED
        else:
            for warning in resources.warnings:  # values dropped or replaced; never patient values
                log.warning("study %s: %s", study_uid, warning)
    return report


def convert_folder(path: str | os.PathLike[str], options: MappingOptions = MappingOptions(), *,
                   progress: Callable[[Path], None] | None = None) -> ConversionReport:
    """Convert every DICOM file under path (recursively) to FHIR resources, one set per study.

    Reads headers only. Unusable files are skipped (report.skipped, one warning each);
    a study whose instances disagree on PatientID is not converted (report.rejected).
    Nothing is written: see write_studies, or the ``dicom-fhir-scp convert`` command.
    progress, when given, is called with each file's path after it was read.
    Raises FileNotFoundError when path does not exist.
    """
    return convert_files(list_files(path), options, progress=progress)


def process_dicom_2_fhir(source: str | os.PathLike[str] | Dataset | Iterable[Dataset],
                         options: MappingOptions = MappingOptions(), *,
                         contained_patient_id: str = "patient") -> ImagingStudy | None:
    """Drop-in for ``process_dicom_2_fhir`` of dicom-fhir-converter and of PyPI's dicom2fhir.

    source: a folder of DICOM files (searched recursively, as dicom-fhir-converter's
    ``process_dicom_2_fhir(dcmDir)``), or pydicom Datasets already in memory (an
    iterable, or one Dataset, as dicom2fhir's ``process_dicom_2_fhir(datasets)``).

    Returns one fhir.resources.R4B ImagingStudy with the Patient (and Endpoint, when
    options.dicomweb_url is set) contained, or None when there is no usable instance
    (as the originals). contained_patient_id is the contained Patient's id, which
    ImagingStudy.subject refers to as "#<id>": "patient" by default; pass
    "patient.contained.inline" for the documents dicom-fhir-converter produced.

    Unlike the originals, several studies raise MultipleStudiesError naming their UIDs
    instead of dropping all but one, and instances disagreeing on PatientID raise
    PatientMismatchError. From a folder, unusable files are skipped (logged); among
    Datasets, one without the UIDs the mapping needs raises MappingError.
    """
    if not _FHIR_ID.fullmatch(contained_patient_id):
        raise ConfigurationError(f"contained_patient_id: {contained_patient_id!r} is not a FHIR id "
                                 "(1-64 letters, digits, '-' and '.')")
    if isinstance(source, (str, os.PathLike)):
        resources = _one_study_of_folder(source, options)
    else:
        resources = _one_study_of_datasets([source] if isinstance(source, Dataset) else source, options)
    if resources is None:
        return None
    document = render(resources, "contained")
    return ImagingStudy.model_validate(_with_contained_patient_id(document, contained_patient_id))


_FHIR_ID = re.compile(r"[A-Za-z0-9.\-]{1,64}")  # fullmatch: "$" would let a final "\n" pass


def _one_study_of_folder(directory: str | os.PathLike[str], options: MappingOptions) -> StudyResources | None:
    report = convert_folder(directory, options)
    uids = list(report.studies) + list(report.rejected)
    if len(uids) > 1:
        raise MultipleStudiesError(f"{directory}: holds {len(uids)} studies, expected one: {', '.join(uids)}")
    if report.rejected:
        study_uid, reason = next(iter(report.rejected.items()))
        if reason == PATIENT_MISMATCH:
            raise PatientMismatchError(f"study {study_uid} in {directory}: {reason}")
        raise MappingError(f"study {study_uid} in {directory}: {reason}")
    return next(iter(report.studies.values()), None)


def _one_study_of_datasets(datasets: Iterable[Dataset], options: MappingOptions) -> StudyResources | None:
    studies = convert_datasets(datasets, options)
    if len(studies) > 1:
        raise MultipleStudiesError(f"the datasets hold {len(studies)} studies, expected one: {', '.join(studies)}")
    for study_uid, resources in studies.items():
        for warning in resources.warnings:  # values dropped or replaced; never patient values
            log.warning("study %s: %s", study_uid, warning)
    return next(iter(studies.values()), None)


def _with_contained_patient_id(document: dict, patient_id: str) -> dict:
    """The contained document with its Patient's id, and every local reference to it, set to patient_id.

    Done on the rendered document (not in mapping/): the id is a compatibility choice of
    this function's callers, not part of the mapping.
    """
    old = next((r.get("id") for r in document.get("contained", []) if r.get("resourceType") == "Patient"), None)
    if old is None or old == patient_id:
        return document
    return _replace_references(document, f"#{old}", f"#{patient_id}", old, patient_id)


def _replace_references(node, old_ref: str, new_ref: str, old_id: str, new_id: str):
    if isinstance(node, list):
        return [_replace_references(item, old_ref, new_ref, old_id, new_id) for item in node]
    if not isinstance(node, dict):
        return node
    result = {}
    for key, value in node.items():
        if key == "reference" and value == old_ref:
            result[key] = new_ref
        elif key == "id" and value == old_id and node.get("resourceType") == "Patient":
            result[key] = new_id
        else:
            result[key] = _replace_references(value, old_ref, new_ref, old_id, new_id)
    return result


# --- writing ------------------------------------------------------------------------------


def write_studies(report: ConversionReport, out_dir: str | os.PathLike[str], shape: str = "bundle") -> None:
    """Write each converted study to out_dir/<StudyInstanceUID>.json, merging with an existing file.

    A study whose existing file cannot be read, or names another patient, is left as it
    is and recorded in report.rejected.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for study_uid, resources in report.studies.items():
        try:
            path, changed = write_study(resources, out_dir, shape)
        except PatientMismatchError as exc:
            log.warning("study %s not written: %s already holds another patient's study",
                        study_uid, out_dir / f"{study_uid}.json")
            log.debug("study %s: %s", study_uid, exc)
            report.rejected[study_uid] = OUTPUT_OTHER_PATIENT
            continue
        except UnusableOutputError as exc:
            log.warning("study %s not written: %s", study_uid, exc)
            report.rejected[study_uid] = OUTPUT_UNREADABLE
            continue
        except MappingError as exc:  # not valid R4 (names the study and elements, never values)
            log.warning("study %s not written: %s", study_uid, exc)
            report.rejected[study_uid] = NOT_MAPPED
            continue
        report.written[study_uid] = path
        if not changed:
            report.unchanged.add(study_uid)
