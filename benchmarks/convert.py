"""Benchmark: folder conversion vs a bare pydicom header-read loop over the same files.

    .venv/bin/python benchmarks/convert.py [--n 2000] [--series 4] [--repeat 5] [--jobs N] [--profile] [--fhir-version R5]

Generates one study of N real CT headers (pydicom's CT_small.dcm cloned with new
UIDs, tests.dicomgen), then times, interleaved, REPEAT times each:

  bare     for each file: pydicom.dcmread(path, stop_before_pixels=True)
  convert  what `dicom-fhir-scp convert` does in process: list the folder, read and
           check each header, InstanceHeader, convert_study, render, write the
           study's JSON (atomically, into a fresh output folder), in one process
  jobs     the same with --jobs N (default: one per CPU): headers read in N worker
           processes started for the run (their start-up is in the time), as
           `convert --jobs N` does

and prints instances/s for each (best run) and the time ratios to bare.
Targets: convert/bare <= 1.5, jobs/bare <= 0.7 (issue #14). Exit status 1 when missed.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from mapping.options import MappingOptions  # noqa: E402
from scp.sources.folder import convert_files, list_files, write_studies  # noqa: E402
from scp.sources.parallel import default_jobs  # noqa: E402
from tests.dicomgen import generate_study  # noqa: E402

TARGET_RATIO = 1.5
TARGET_JOBS_RATIO = 0.7


def bare(files: list[Path]) -> None:
    for path in files:
        pydicom.dcmread(path, stop_before_pixels=True)


def convert(folder: Path, out_dir: Path, fhir_version: str = "R4", jobs: int = 1) -> None:
    report = convert_files(list_files(folder), MappingOptions(fhir_version=fhir_version), jobs=jobs)
    write_studies(report, out_dir, "bundle")
    if len(report.written) != 1 or report.skipped:
        raise SystemExit(f"benchmark: unexpected result: {report.summary()}")


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="instances (default 2000)")
    parser.add_argument("--series", type=int, default=4, help="series (default 4)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="worker processes (default: one per CPU)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one convert run")
    parser.add_argument("--fhir-version", choices=("R4", "R5"), default="R4",
                        help="FHIR release written (R5: the R4 -> R5 rendering included; default R4)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        folder = Path(tmp, "in")
        generate_study(folder, args.n, args.series)
        files = sorted(folder.iterdir())
        bare(files)  # warm the page cache and pydicom's imports
        bare_times, convert_times, jobs_times = [], [], []
        for run in range(args.repeat):
            out_dir = Path(tmp, f"out{run}")
            bare_times.append(timed(bare, files))
            convert_times.append(timed(convert, folder, out_dir, args.fhir_version))
            shutil.rmtree(out_dir)
            jobs_times.append(timed(convert, folder, out_dir, args.fhir_version, args.jobs))
            shutil.rmtree(out_dir)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(convert, folder, Path(tmp, "out-profile"), args.fhir_version)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)

    best_bare, best_convert, best_jobs = min(bare_times), min(convert_times), min(jobs_times)
    ratio, jobs_ratio = best_convert / best_bare, best_jobs / best_bare
    print(f"instances: {args.n} in {args.series} series, FHIR {args.fhir_version}, best of {args.repeat} "
          f"interleaved runs")
    print(f"bare dcmread(stop_before_pixels=True): {args.n / best_bare:8.0f} instances/s  ({best_bare:.3f} s)")
    print(f"convert (read, map, write JSON):      {args.n / best_convert:8.0f} instances/s  ({best_convert:.3f} s)")
    print(f"convert --jobs {args.jobs}:                   {args.n / best_jobs:8.0f} instances/s  ({best_jobs:.3f} s)")
    print(f"ratio convert/bare time: {ratio:.2f}  (target <= {TARGET_RATIO}): {'OK' if ratio <= TARGET_RATIO else 'MISSED'}")
    jobs_ok = jobs_ratio <= TARGET_JOBS_RATIO
    print(f"ratio convert --jobs {args.jobs}/bare time: {jobs_ratio:.2f}  (target <= {TARGET_JOBS_RATIO}): "
          f"{'OK' if jobs_ok else 'MISSED'}")
    return 0 if ratio <= TARGET_RATIO and jobs_ok else 1


if __name__ == "__main__":
    sys.exit(main())
