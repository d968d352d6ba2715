"""Generate realistic test studies: a real scanner header cloned with new UIDs.

Used by tests and benchmarks (benchmarks put the repository root on sys.path).
Writes real DICOM Part 10 files that dcmtk and pynetdicom can send.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

DEFAULT_TEMPLATE = "CT_small.dcm"  # real GE CT header, 128x128 16-bit, about 39 KB


@dataclass(frozen=True)
class GeneratedStudy:
    study_uid: str
    series_uids: tuple[str, ...]
    files: tuple[Path, ...]

    @property
    def sop_uids(self) -> list[str]:
        return [p.stem for p in self.files]


def template_dataset(name: str = DEFAULT_TEMPLATE) -> pydicom.Dataset:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} is not available")
    return pydicom.dcmread(path)


def generate_study(
    out_dir: Path,
    n_instances: int = 2000,
    n_series: int = 4,
    *,
    template: str = DEFAULT_TEMPLATE,
    study_uid: str | None = None,
    series_uids: tuple[str, ...] | None = None,
    patient_id: str | None = None,
    patient_name: str | None = None,
    first_instance: int = 1,
) -> GeneratedStudy:
    """Write n_instances files (<SOPInstanceUID>.dcm) spread evenly over n_series series.

    Pass study_uid/series_uids to generate a further part of an existing study.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = template_dataset(template)
    study_uid = study_uid or generate_uid()
    series_uids = tuple(series_uids or (generate_uid() for _ in range(n_series)))
    ds.StudyInstanceUID = study_uid
    if patient_id is not None:
        ds.PatientID = patient_id
    if patient_name is not None:
        ds.PatientName = patient_name
    files = []
    for i in range(n_instances):
        series_index = i * len(series_uids) // n_instances
        ds.SeriesInstanceUID = series_uids[series_index]
        ds.SeriesNumber = series_index + 1
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = first_instance + i
        path = out_dir / f"{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return GeneratedStudy(study_uid, series_uids, tuple(files))
