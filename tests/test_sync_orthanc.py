"""`dicom-fhir-scp sync` against a real DICOMweb server: Orthanc with its DICOMweb plugin
(tests/orthanc_dicomweb.py), into the real FHIR engine (tests/fhir_engine.py) and the disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.fhir_engine import fhir_engine, fhir_engine_process  # noqa: F401 (fixtures)
from tests.mapping_cases import DICOMDIR_TESTS, charset_file
from tests.orthanc_dicomweb import OrthancDicomWeb, require_orthanc_dicomweb

pytestmark = [pytest.mark.interop]

REPO = Path(__file__).resolve().parent.parent


def _study_files() -> list[Path]:
    files = [p for p in sorted(DICOMDIR_TESTS.rglob("*")) if p.is_file() and "DICOMDIR" not in p.name
             and "README" not in p.name]
    files += [Path(get_testdata_file("CT_small.dcm")), charset_file("chrH31.dcm"), charset_file("chrX1.dcm")]
    return files


@pytest.fixture
def orthanc(tmp_path):
    require_orthanc_dicomweb()
    (tmp_path / "orthanc").mkdir()
    with OrthancDicomWeb(tmp_path / "orthanc") as server:
        yield server


def _sync(tmp_path: Path, orthanc: OrthancDicomWeb, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "scp", "sync", "--dicomweb-url", orthanc.dicomweb_url,
               "-od", str(tmp_path / "out"), "--spool-dir", str(tmp_path / "spool"),
               "--dead-letter-dir", str(tmp_path / "dead"), "--window-days", "3650", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _convert(tmp_path: Path, files: list[Path]) -> Path:
    """What the node's mapping makes of the same files (convert: the same mapping, from Part 10)."""
    folder = tmp_path / "files"
    folder.mkdir()
    for i, path in enumerate(files):
        (folder / f"{i}.dcm").write_bytes(path.read_bytes())
    out = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "scp", "convert", str(folder), "-od", str(out)], check=True,
                   capture_output=True, timeout=300, cwd=REPO)
    return out


def _node_outputs(tmp_path: Path, files: list[Path], studies: int):
    """The same files sent to the node over C-STORE (dcmsend: each file in its own transfer syntax)."""
    from tests.conftest import require_tool
    from tests.scp_node import NodeProcess

    require_tool("dcmsend")
    folder = tmp_path / "to-send"
    folder.mkdir()
    for i, path in enumerate(files):
        (folder / f"{i}.dcm").write_bytes(path.read_bytes())
    node = NodeProcess(tmp_path / "node").start()
    try:
        subprocess.run(["dcmsend", "-nh", "-nuc", "+sd", "+r", "-aec", "FHIRSCP", "127.0.0.1", str(node.port),
                        str(folder)], check=True, capture_output=True, timeout=120)
        node.wait_for_deliveries_total(len(files), studies, timeout=60)
    finally:
        node.stop()
    return node


def test_backfill_delivers_every_study_with_the_content_the_mapping_gives_from_the_files(
        tmp_path, orthanc, fhir_engine):
    files = _study_files()
    orthanc.upload(files)
    study_uids = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in files}

    result = _sync(tmp_path, orthanc, "--fhir-url", fhir_engine.base_url)
    assert result.returncode == 0, result.stderr[-3000:]

    node = _node_outputs(tmp_path, files, len(study_uids))
    converted = _convert(tmp_path, files)
    for uid in study_uids:
        ours = json.loads((tmp_path / "out" / f"{uid}.json").read_text())
        assert ours == node.output_of(uid), uid
        assert ours == json.loads((converted / f"{uid}.json").read_text()), uid
    in_fhir = {i["value"].removeprefix("urn:oid:") for s in fhir_engine.resources("ImagingStudy")
               for i in s["identifier"] if i.get("system") == "urn:dicom:uid"}
    assert in_fhir == study_uids


def test_a_second_run_fetches_no_metadata_and_writes_nothing_to_fhir(tmp_path, orthanc, fhir_engine):
    orthanc.upload(_study_files()[:12])
    assert _sync(tmp_path, orthanc, "--fhir-url", fhir_engine.base_url).returncode == 0
    fhir_engine.reset_stats()

    again = _sync(tmp_path, orthanc, "--fhir-url", fhir_engine.base_url)

    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 delivered" in again.stderr and "done before" in again.stderr
    assert fhir_engine.request_log() == []


def _output(tmp_path: Path, uid: str) -> dict | None:
    path = tmp_path / "out" / f"{uid}.json"
    if not path.exists():
        return None
    document = json.loads(path.read_text())
    return next(e["resource"] for e in document["entry"] if e["resource"]["resourceType"] == "ImagingStudy")


def _fhir_study(engine, uid: str) -> dict | None:
    return next((s for s in engine.resources("ImagingStudy")
                 if any(i.get("value") == f"urn:oid:{uid}" for i in s.get("identifier", []))), None)


def test_follow_picks_up_new_studies_added_instances_and_deleted_series_and_studies(tmp_path, orthanc, fhir_engine):
    from tests.clocks import wait_for
    from tests.dicomgen import generate_study

    first = generate_study(tmp_path / "first", n_instances=4, n_series=2)
    orthanc.upload(first.files[:3])
    command = [sys.executable, "-m", "scp", "sync", "--dicomweb-url", orthanc.dicomweb_url,
               "--orthanc-url", orthanc.rest_url, "--follow", "--poll-interval", "0.3", "--window-days", "3650",
               "--fhir-url", fhir_engine.base_url,
               "-od", str(tmp_path / "out"), "--spool-dir", str(tmp_path / "spool"),
               "--dead-letter-dir", str(tmp_path / "dead")]
    log = open(tmp_path / "sync.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: _output(tmp_path, first.study_uid), 60, "the backfilled study")
        assert _output(tmp_path, first.study_uid)["numberOfInstances"] == 3

        orthanc.upload(first.files[3:])  # an instance added to a delivered study
        wait_for(lambda: (_output(tmp_path, first.study_uid) or {}).get("numberOfInstances") == 4, 60,
                 "the added instance")

        later = generate_study(tmp_path / "later", n_instances=2, n_series=1)
        orthanc.upload(later.files)  # a study uploaded while following
        wait_for(lambda: _output(tmp_path, later.study_uid), 60, "the study uploaded later")

        series = _output(tmp_path, first.study_uid)["series"]
        orthanc.delete_series(series[0]["uid"])
        wait_for(lambda: _output(tmp_path, first.study_uid)["numberOfSeries"] == 1, 60, "the deleted series")
        assert _output(tmp_path, first.study_uid)["numberOfInstances"] == 4 - series[0]["numberOfInstances"]
        wait_for(lambda: _fhir_study(fhir_engine, first.study_uid)["numberOfSeries"] == 1, 30,
                 "the deleted series on the FHIR server")

        orthanc.delete_study(later.study_uid)
        wait_for(lambda: _output(tmp_path, later.study_uid)["status"] == "entered-in-error", 60,
                 "the deleted study")
        wait_for(lambda: _fhir_study(fhir_engine, later.study_uid)["status"] == "entered-in-error", 30,
                 "the deleted study on the FHIR server")
    except AssertionError:
        log.flush()
        raise AssertionError((tmp_path / "sync.log").read_text()[-4000:]) from None
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_status_shows_the_sync_checkpoint_and_its_lag(tmp_path, orthanc):
    orthanc.upload([Path(get_testdata_file("CT_small.dcm"))])
    assert _sync(tmp_path, orthanc).returncode == 0
    status = subprocess.run([sys.executable, "-m", "scp", "status", "--spool-dir", str(tmp_path / "spool"),
                             "--dead-letter-dir", str(tmp_path / "dead")], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert f"sync from {orthanc.dicomweb_url}: backfill finished" in status.stdout
    assert "1 study(ies) delivered, 0 failed" in status.stdout and "s ago" in status.stdout


def test_the_source_down_mid_run_is_retried_and_nothing_is_lost(tmp_path, orthanc):
    import threading

    files = _study_files()[:12]
    orthanc.upload(files)
    study_uids = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in files}
    orthanc.stop()
    # The sync starts while the server is down; it comes back after a few failed attempts.
    restart = threading.Timer(3.0, orthanc.start)
    restart.start()
    try:
        result = _sync(tmp_path, orthanc, "--retries", "8")
    finally:
        restart.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trying again" in result.stderr
    assert {p.stem for p in (tmp_path / "out").glob("*.json")} == study_uids


def _dated_studies(folder: Path, n: int, *, first: str = "2020-01-01", step_days: int = 10) -> dict[str, Path]:
    """n one-instance studies, StudyDate first + i * step_days: StudyInstanceUID -> file."""
    import datetime as dt

    from tests.dicomgen import generate_study

    start = dt.date.fromisoformat(first)
    studies = {}
    for i in range(n):
        study = generate_study(folder / str(i), n_instances=1, n_series=1)
        ds = pydicom.dcmread(study.files[0])
        ds.StudyDate = (start + dt.timedelta(days=i * step_days)).strftime("%Y%m%d")
        ds.save_as(study.files[0])
        studies[study.study_uid] = study.files[0]
    return studies


def test_a_killed_backfill_resumes_without_fetching_finished_windows_again(tmp_path, orthanc):
    import signal

    from tests.clocks import wait_for

    studies = _dated_studies(tmp_path / "dated", 20)
    orthanc.upload(studies.values())
    range_flags = ["--since", "2020-01-01", "--until", "2020-07-31", "--window-days", "10"]
    command = [sys.executable, "-m", "scp", "sync", "--dicomweb-url", orthanc.dicomweb_url,
               "-od", str(tmp_path / "out"), "--spool-dir", str(tmp_path / "spool"),
               "--dead-letter-dir", str(tmp_path / "dead"), *range_flags, "--rate-limit", "4", "--parallel", "1"]
    first_log = tmp_path / "first.log"
    with open(first_log, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            checkpoint = tmp_path / "spool" / "sync"

            def windows_done() -> int:
                files = list(checkpoint.glob("checkpoint-*.json"))
                return len(json.loads(files[0].read_text())["windows_done"]) if files else 0
            wait_for(lambda: windows_done() >= 5, 60, "five windows done", ignore=(ValueError, OSError))
        finally:
            process.send_signal(signal.SIGKILL)  # no chance to save anything more
            process.wait(timeout=30)
    done_before = windows_done()
    assert len(list((tmp_path / "out").glob("*.json"))) < len(studies)  # really killed mid-way

    second = _sync(tmp_path, orthanc, *range_flags)

    assert second.returncode == 0, second.stderr[-3000:]
    assert {p.stem for p in (tmp_path / "out").glob("*.json")} == set(studies)
    assert f"({done_before} done before)" in second.stderr
    deliveries = [line for text in (first_log.read_text(), second.stderr) for line in text.splitlines()
                  if ": disk: " in line]
    # Every study once, but for at most the one in flight when the first run was killed (parallel 1).
    assert len(studies) <= len(deliveries) <= len(studies) + 1


def test_a_window_that_reaches_the_page_size_is_split_and_a_full_day_is_paged(tmp_path, orthanc):
    spread = _dated_studies(tmp_path / "spread", 9, step_days=3)
    same_day = _dated_studies(tmp_path / "same", 5, first="2021-06-01", step_days=0)
    orthanc.upload([*spread.values(), *same_day.values()])

    result = _sync(tmp_path, orthanc, "--page-size", "2", "--since", "2020-01-01", "--until", "2021-12-31")

    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.stem for p in (tmp_path / "out").glob("*.json")} == set(spread) | set(same_day)


def test_studies_without_a_study_date_are_found_by_the_separate_listing(tmp_path, orthanc):
    undated = _dated_studies(tmp_path / "undated", 3)
    for path in undated.values():
        ds = pydicom.dcmread(path)
        del ds.StudyDate
        ds.save_as(path)
    dated = _dated_studies(tmp_path / "dated", 2)
    orthanc.upload([*undated.values(), *dated.values()])

    result = _sync(tmp_path, orthanc, "--page-size", "2")

    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.stem for p in (tmp_path / "out").glob("*.json")} == set(undated) | set(dated)
    assert "3 study(ies) without StudyDate" in result.stderr


def test_a_study_the_fhir_server_refuses_goes_to_the_dead_letter_and_is_tried_again_next_run(
        tmp_path, orthanc, fhir_engine):
    studies = _dated_studies(tmp_path / "dated", 2)
    orthanc.upload(studies.values())
    fhir_engine.fault(count=1, status=422, method="POST")

    first = _sync(tmp_path, orthanc, "--fhir-url", fhir_engine.base_url, "--parallel", "1")

    assert first.returncode == 1
    dead = [p.name for p in (tmp_path / "dead").iterdir()]
    assert len(dead) == 1 and dead[0] in studies
    assert "HTTP 422" in (tmp_path / "dead" / dead[0] / "reason.txt").read_text()
    second = _sync(tmp_path, orthanc, "--fhir-url", fhir_engine.base_url)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (tmp_path / "dead" / dead[0]).exists()
    assert len(fhir_engine.resources("ImagingStudy")) == 2
