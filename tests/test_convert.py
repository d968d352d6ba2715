"""scp.sources.folder as a library: reading headers, skipping unusable files, converting, writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy
from pydicom.data import get_testdata_file

from mapping.errors import MultipleStudiesError, PatientMismatchError
from mapping.options import MappingOptions
from scp.sources import folder as convert
from scp.sources.folder import (ConversionReport, UnusableFileError, convert_folder, list_files,
                         process_dicom_2_fhir, read_dataset, write_studies)
from tests.dicomgen import generate_study

pytestmark = pytest.mark.usefixtures("strict_pydicom")

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
DICOMDIR_TESTS = Path(get_testdata_file("DICOMDIR")).parent
CT_STUDY = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.1"


def copy_cut(source: Path, target: Path, length: int) -> Path:
    target.write_bytes(source.read_bytes()[:length])
    return target


def skip_reason(path: Path) -> str:
    with pytest.raises(UnusableFileError) as info:
        read_dataset(path)
    return info.value.reason


# --- reading ------------------------------------------------------------------------------


def test_a_complete_file_reads_without_pixel_data():
    ds = read_dataset(CT_SMALL)
    assert ds.SOPInstanceUID and "PixelData" not in ds


def test_a_file_cut_inside_pixel_data_is_truncated(tmp_path):
    size = CT_SMALL.stat().st_size  # Pixel Data is followed by 138 bytes of padding
    assert skip_reason(copy_cut(CT_SMALL, tmp_path / "cut.dcm", size - 1000)) == convert.TRUNCATED


def test_a_file_cut_inside_a_header_value_is_truncated(tmp_path):
    study_uid = pydicom.dcmread(CT_SMALL, stop_before_pixels=True).StudyInstanceUID
    offset = CT_SMALL.read_bytes().index(study_uid.encode()) + 10
    assert skip_reason(copy_cut(CT_SMALL, tmp_path / "cut.dcm", offset)) == convert.TRUNCATED


def test_a_cut_encapsulated_pixel_data_is_truncated(tmp_path):
    compressed = Path(get_testdata_file("JPEG2000.dcm"))
    read_dataset(compressed)  # the complete file passes
    cut = copy_cut(compressed, tmp_path / "cut.dcm", compressed.stat().st_size - 100)
    assert skip_reason(cut) == convert.TRUNCATED


def test_bundled_truncated_file_is_truncated():
    assert skip_reason(Path(get_testdata_file("MR_truncated.dcm"))) == convert.TRUNCATED


def test_a_text_file_is_not_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n" * 50)
    assert skip_reason(tmp_path / "notes.txt") == convert.NOT_DICOM


def test_an_empty_file_is_not_dicom(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert skip_reason(tmp_path / "empty.dcm") == convert.NOT_DICOM


def test_a_dataset_without_preamble_is_read(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.file_meta, ds.preamble = pydicom.dataset.FileMetaDataset(), None
    ds.save_as(tmp_path / "bare.dcm", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert read_dataset(tmp_path / "bare.dcm").SOPInstanceUID == ds.SOPInstanceUID


def test_a_dicomdir_is_not_an_instance():
    assert skip_reason(DICOMDIR_TESTS / "DICOMDIR") == convert.DICOMDIR


def test_header_only_files_are_instances():
    # TINY_ALPHA's CT files carry no Pixel Data at all: complete headers, not truncated files.
    tiny = next((DICOMDIR_TESTS / "TINY_ALPHA").rglob("IM000000"))
    assert read_dataset(tiny).Modality == "CT"


def test_list_files_recurses_sorted_and_leaves_out_the_output_folder(tmp_path):
    for name in ("b/2.dcm", "a/1.dcm", "out/x.json", "c.dcm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    files = list_files(tmp_path, exclude=tmp_path / "out")
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["c.dcm", "a/1.dcm", "b/2.dcm"]


# --- converting ---------------------------------------------------------------------------


def test_convert_folder_reports_studies_skipped_files_and_counts():
    report = convert_folder(DICOMDIR_TESTS)
    assert isinstance(report, ConversionReport)
    assert len(report.studies) == 7
    assert report.instances_read == 81 and report.files_seen == 91
    assert report.skip_reasons() == {convert.DICOMDIR: 8, convert.NOT_DICOM: 2}
    ct = report.studies[CT_STUDY].imaging_study
    assert (ct["numberOfSeries"], ct["numberOfInstances"]) == (2, 7)


def test_convert_folder_applies_the_options(tmp_path):
    generate_study(tmp_path, 1, 1)
    [resources] = convert_folder(tmp_path, MappingOptions(dicomweb_url="https://pacs.example.org/dicom-web")).studies.values()
    assert [e["address"] for e in resources.endpoints] == ["https://pacs.example.org/dicom-web"]


def test_a_file_copied_twice_counts_once(tmp_path):
    study = generate_study(tmp_path / "in", 2, 1)
    shutil.copy(study.files[0], tmp_path / "in" / "copy.dcm")
    report = convert_folder(tmp_path / "in")
    assert report.studies[study.study_uid].imaging_study["numberOfInstances"] == 2
    assert report.duplicate_instances == 1


def test_instances_disagreeing_on_patient_id_reject_the_study(tmp_path):
    study = generate_study(tmp_path / "a", 1, 1, patient_id="P1")
    generate_study(tmp_path / "b", 1, 1, study_uid=study.study_uid, patient_id="P2")
    report = convert_folder(tmp_path)
    assert study.study_uid not in report.studies
    assert report.rejected == {study.study_uid: "instances disagree on PatientID"}


def test_process_dicom_2_fhir_returns_the_contained_shape(tmp_path):
    study = generate_study(tmp_path, 3, 2)
    result = process_dicom_2_fhir(tmp_path)
    assert isinstance(result, ImagingStudy)
    [patient] = [r for r in result.contained if r.get_resource_type() == "Patient"]
    assert result.subject.reference == f"#{patient.id}"
    assert (result.numberOfSeries, result.numberOfInstances) == (2, 3)
    assert result.identifier[0].value == f"urn:oid:{study.study_uid}"


def test_process_dicom_2_fhir_accepts_a_string_path(tmp_path):
    generate_study(tmp_path, 1, 1)
    assert process_dicom_2_fhir(str(tmp_path)).numberOfInstances == 1


def test_process_dicom_2_fhir_raises_naming_both_studies(tmp_path):
    first = generate_study(tmp_path / "a", 1, 1)
    second = generate_study(tmp_path / "b", 1, 1)
    with pytest.raises(MultipleStudiesError) as info:
        process_dicom_2_fhir(tmp_path)
    assert first.study_uid in str(info.value) and second.study_uid in str(info.value)


def test_process_dicom_2_fhir_raises_on_mixed_patients(tmp_path):
    study = generate_study(tmp_path / "a", 1, 1, patient_id="P1")
    generate_study(tmp_path / "b", 1, 1, study_uid=study.study_uid, patient_id="P2")
    with pytest.raises(PatientMismatchError):
        process_dicom_2_fhir(tmp_path)


def test_process_dicom_2_fhir_returns_none_without_dicom_files(tmp_path):
    (tmp_path / "notes.txt").write_text("no DICOM here\n")
    assert process_dicom_2_fhir(tmp_path) is None


# --- writing ------------------------------------------------------------------------------


def test_second_part_of_a_study_is_merged_into_the_existing_file(tmp_path):
    first = generate_study(tmp_path / "part1", 2, 1)
    generate_study(tmp_path / "part2", 3, 1, study_uid=first.study_uid, series_uids=first.series_uids,
                   first_instance=3)
    write_studies(convert_folder(tmp_path / "part1"), tmp_path / "out")
    write_studies(convert_folder(tmp_path / "part2"), tmp_path / "out", "bundle")
    report = convert_folder(tmp_path / "part1")  # already in the file: nothing new
    write_studies(report, tmp_path / "out")
    assert report.unchanged == {first.study_uid}
    doc = json.loads((tmp_path / "out" / f"{first.study_uid}.json").read_text())
    [study] = [e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]
    assert study["numberOfInstances"] == 5 and len(study["series"][0]["instance"]) == 5


def test_an_unchanged_study_is_not_written_again(tmp_path):
    study = generate_study(tmp_path / "in", 2, 1)
    write_studies(convert_folder(tmp_path / "in"), tmp_path / "out")
    before = (tmp_path / "out" / f"{study.study_uid}.json").stat()
    report = convert_folder(tmp_path / "in")
    write_studies(report, tmp_path / "out")
    after = (tmp_path / "out" / f"{study.study_uid}.json").stat()
    assert report.unchanged == {study.study_uid}
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # a rewrite renames a new file


def test_write_leaves_no_temporary_files(tmp_path):
    generate_study(tmp_path / "in", 1, 1)
    write_studies(convert_folder(tmp_path / "in"), tmp_path / "out")
    assert [p.suffix for p in (tmp_path / "out").iterdir()] == [".json"]


def test_an_unreadable_existing_output_file_is_kept_and_the_study_not_written(tmp_path):
    study = generate_study(tmp_path / "in", 1, 1)
    (tmp_path / "out").mkdir()
    existing = tmp_path / "out" / f"{study.study_uid}.json"
    existing.write_text("{ half a file")
    report = convert_folder(tmp_path / "in")
    write_studies(report, tmp_path / "out")
    assert existing.read_text() == "{ half a file"
    assert report.rejected == {study.study_uid: "existing output file unreadable"}
    assert not report.written


def test_an_existing_output_file_of_another_patient_is_not_overwritten(tmp_path):
    study = generate_study(tmp_path / "a", 1, 1, patient_id="P1")
    write_studies(convert_folder(tmp_path / "a"), tmp_path / "out")
    before = (tmp_path / "out" / f"{study.study_uid}.json").read_text()
    generate_study(tmp_path / "b", 1, 1, study_uid=study.study_uid, patient_id="P2")
    report = convert_folder(tmp_path / "b")
    write_studies(report, tmp_path / "out")
    assert (tmp_path / "out" / f"{study.study_uid}.json").read_text() == before
    assert report.rejected == {study.study_uid: "output file holds another patient"}


def test_values_dropped_by_the_mapping_are_logged_per_study_without_patient_values(tmp_path, caplog):
    study = generate_study(tmp_path, 2, 1, patient_id="PID-SECRET-7")
    for path in study.files:
        ds = pydicom.dcmread(path)
        ds.PatientSex = "XQ"  # non-standard
        ds.save_as(path)
    with caplog.at_level("WARNING", logger="scp.sources.folder"):
        report = convert_folder(tmp_path)
    assert report.studies[study.study_uid].patient["gender"] == "unknown"
    lines = [r.getMessage() for r in caplog.records if "PatientSex" in r.getMessage()]
    assert lines == [f"study {study.study_uid}: PatientSex (0010,0040): non-standard value, gender set to unknown"]
    assert "PID-SECRET-7" not in caplog.text
