"""Benchmark: `sync` backfill of N studies from Orthanc's DICOMweb into the FHIR engine.

    .venv/bin/python benchmarks/sync.py [--studies 200] [--instances 3] [--parallel 4]

Generates N studies of real CT headers (tests.dicomgen; INSTANCES each, StudyDates spread
over two years), uploads them to Orthanc with its DICOMweb plugin in a network namespace
(tests/orthanc_dicomweb.py, needs root), starts the validating FHIR engine
(tests/fhir_engine.py), then measures in the same run:

  bare      a loop doing only the QIDO-RS listing (one request per sync window, the same
            windows) and WADO-RS /metadata per study with `parallel` threads (requests): the
            floor, what Orthanc costs to answer
  disk      `dicom-fhir-scp sync` (a subprocess, start-up included) to -od only: the sync's
            own cost over the bare loop (mapping, checkpoint, files)
  sync      the same with the FHIR sink only (the engine validates and stores each study)
  resync    the same command again on its checkpoint (nothing to fetch or send)

and prints studies/s, DICOMweb requests and FHIR requests per study for each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
import requests  # noqa: E402

from tests.dicomgen import generate_study  # noqa: E402
from tests.fhir_engine import FhirEngine  # noqa: E402
from tests.orthanc_dicomweb import OrthancDicomWeb  # noqa: E402
from scp.sources.dicomweb.windows import EARLIEST, windows  # noqa: E402

WINDOW_DAYS = 30


def make_studies(folder: Path, n: int, instances: int) -> list[Path]:
    files = []
    start = dt.date(2024, 1, 1)
    for i in range(n):
        study = generate_study(folder / str(i), n_instances=instances, n_series=1)
        date = (start + dt.timedelta(days=(i * 730) // n)).strftime("%Y%m%d")
        for path in study.files:
            ds = pydicom.dcmread(path)
            ds.StudyDate = date
            ds.save_as(path)
        files += study.files
    return files


def bare(dicomweb_url: str, parallel: int, today: dt.date) -> tuple[int, int]:
    """The same QIDO windows and metadata requests, nothing else: (studies, requests)."""
    session = requests.Session()
    uids, requests_made = [], 0
    for window in windows(EARLIEST, today, WINDOW_DAYS):
        reply = session.get(f"{dicomweb_url}/studies", params={"StudyDate": window.query, "limit": "1000"},
                            headers={"Accept": "application/dicom+json"}, timeout=60)
        requests_made += 1
        if reply.status_code == 200 and reply.content.strip():
            uids += [obj["0020000D"]["Value"][0] for obj in reply.json()]

    def metadata(uid: str) -> None:
        requests.get(f"{dicomweb_url}/studies/{uid}/metadata", headers={"Accept": "application/dicom+json"},
                     timeout=60).raise_for_status()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(metadata, uids))
    return len(uids), requests_made + len(uids)


def run_sync(workdir: Path, dicomweb_url: str, fhir_url: str | None, parallel: int, spool: str = "spool") -> str:
    command = [sys.executable, "-m", "scp", "sync", "--dicomweb-url", dicomweb_url,
               "--spool-dir", str(workdir / spool), "--dead-letter-dir", str(workdir / "dead"),
               "--window-days", str(WINDOW_DAYS), "--parallel", str(parallel)]
    if fhir_url:
        command += ["--fhir-url", fhir_url]
        # FHIR only: the disk sink off ("" unsets node.output_dir), as a FHIR deployment runs it.
        env = {**os.environ, "DICOM_FHIR_SCP_NODE_OUTPUT_DIR": ""}
    else:
        env = {**os.environ, "DICOM_FHIR_SCP_NODE_OUTPUT_DIR": str(workdir / "out")}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=3600, env=env)
    if result.returncode != 0:
        raise SystemExit(f"sync failed:\n{result.stderr[-3000:]}")
    return result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    try:
        files = make_studies(workdir / "studies", args.studies, args.instances)
        (workdir / "orthanc").mkdir()
        with OrthancDicomWeb(workdir / "orthanc") as orthanc, FhirEngine.start() as engine:
            orthanc.upload(files)
            today = dt.date.today()
            started = time.monotonic()
            found, bare_requests = bare(orthanc.dicomweb_url, args.parallel, today)
            bare_s = time.monotonic() - started
            print(f"bare     {found} studies in {bare_s:.1f} s = {found / bare_s:.1f} studies/s, "
                  f"{bare_requests / found:.2f} DICOMweb requests/study, 0 FHIR requests")
            for name in ("disk", "sync", "resync"):
                engine.reset_stats()
                started = time.monotonic()
                log = run_sync(workdir, orthanc.dicomweb_url, None if name == "disk" else engine.base_url,
                               args.parallel, "spool-disk" if name == "disk" else "spool")
                elapsed = time.monotonic() - started
                fhir = engine.stats()["requests"]
                summary = next(line for line in log.splitlines() if "DICOMweb request(s)" in line)
                dicomweb = int(summary.split(" DICOMweb request(s)")[0].rsplit(" ", 1)[1])
                print(f"{name:8} {args.studies} studies in {elapsed:.1f} s = {args.studies / elapsed:.1f} studies/s, "
                      f"{dicomweb / args.studies:.2f} DICOMweb requests/study, "
                      f"{fhir / args.studies:.2f} FHIR requests/study")
            imaging = len(engine.resources("ImagingStudy"))
            print(f"ImagingStudy on the FHIR server: {imaging} (expected {args.studies})")
            return 0 if imaging == args.studies else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
