"""Benchmark: merging an unchanged study into its own output vs converting it from headers.

    .venv/bin/python benchmarks/merge.py [--n 2000] [--series 4] [--repeat 7] [--profile]

Builds the InstanceHeaders of one study of N instances (pydicom's real CT_small.dcm header
with new UIDs, as tests.dicomgen clones it), then times, interleaved, REPEAT times each:

  convert  convert_study(headers): the baseline, the mapping's own cost
  disk     scp.sinks.disk.write_study of the same study into a folder that already holds
           its file: read, parse_resources, merge_resources, render, compare -> unchanged
  fhir     the FHIR sink's pure part of a resend: the patient check and the merge of our
           ImagingStudy into the one the server returned (a parsed JSON dict, server
           references and meta), then the unchanged check -> unchanged

and, for information, validate_resources (the edge: what a changed file or a send costs on
top); prints the median of each and the ratios disk/convert and fhir/convert.
Target: both ratios <= 2 (before the mapping worked on dicts: about 6.5). Exit status 1 when missed.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mapping import (InstanceHeader, MappingOptions, StudyResources, convert_study, render,  # noqa: E402
                     validate_resources)
from scp.sinks.disk import write_study  # noqa: E402
from scp.sinks.fhir.sink import ServerStudy, check_same_patient, merged_body  # noqa: E402
from tests.dicomgen import template_dataset  # noqa: E402

TARGET_RATIO = 2.0
ROOT = "1.2.826.0.1.3680043.10.543"  # UIDs of the benchmark's study: <root>.<series>.<instance>
OPTIONS = MappingOptions(patient_identifier_system="http://hospital.example/mrn",
                         dicomweb_url="https://pacs.example/dicom-web")


def study_headers(n: int, n_series: int) -> list[InstanceHeader]:
    """n instances of one study in n_series series, as the node keeps them (headers only)."""
    ds = template_dataset()
    ds.StudyInstanceUID = f"{ROOT}.1"
    headers = []
    for i in range(n):
        series = i * n_series // n + 1
        ds.SeriesInstanceUID = f"{ROOT}.1.{series}"
        ds.SeriesNumber = series
        ds.SOPInstanceUID = f"{ROOT}.1.{series}.{i + 1}"
        ds.InstanceNumber = i + 1
        headers.append(InstanceHeader.from_dataset(ds))
    return headers


def server_copy(resources: StudyResources) -> ServerStudy:
    """The ImagingStudy as a FHIR server returns it after the first delivery: its own id and
    meta, references resolved to server ids, parsed from JSON."""
    bundle = render(resources, "bundle")
    [study] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]
    study = {"resourceType": "ImagingStudy", "id": "17",
             "meta": {"versionId": "1", "lastUpdated": "2026-12-01T10:00:00.000Z"},
             **{k: v for k, v in study.items() if k != "resourceType"}}
    study["subject"] = {**study["subject"], "reference": "Patient/5"}
    # A server resolves each urn:uuid reference to its Endpoint's id and keeps the identifier.
    study["endpoint"] = [{**e, "reference": "Endpoint/9"} for e in study["endpoint"]]
    study["series"] = [{**s, "endpoint": [{**e, "reference": "Endpoint/9"} for e in s["endpoint"]]}
                       for s in study["series"]]
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    resource = json.loads(json.dumps(study))
    return ServerStudy("17", "1", resource, (json.loads(json.dumps(patient)) | {"id": "5"},))


def disk_merge(resources: StudyResources, folder: Path) -> None:
    _, changed = write_study(resources, folder, "bundle")
    if changed:
        raise SystemExit("benchmark: merging the unchanged study rewrote its file")


def fhir_merge(resources: StudyResources, server: ServerStudy) -> None:
    check_same_patient(server, resources, "benchmark")
    if merged_body(server, resources.imaging_study, "benchmark") is not None:
        raise SystemExit("benchmark: merging the unchanged study into the server's copy changed it")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="instances (default 2000)")
    parser.add_argument("--series", type=int, default=4, help="series (default 4)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of each (default 7)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one disk and fhir merge")
    args = parser.parse_args()

    headers = study_headers(args.n, args.series)
    resources = convert_study(headers, OPTIONS)
    server = server_copy(resources)
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        folder = Path(tmp)
        write_study(resources, folder, "bundle")  # the output of the first delivery
        size = (folder / f"{resources.study_uid}.json").stat().st_size
        scenarios: dict[str, Callable[[], object]] = {
            "convert": lambda: convert_study(headers, OPTIONS),
            "disk": lambda: disk_merge(resources, folder),
            "fhir": lambda: fhir_merge(resources, server),
            "validate": lambda: validate_resources(resources),
        }
        for run in scenarios.values():
            run()  # warm up
        times: dict[str, list[float]] = {name: [] for name in scenarios}
        for _ in range(args.repeat):
            for name, run in scenarios.items():
                times[name].append(timed(run))
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(scenarios["disk"])
            profiler.runcall(scenarios["fhir"])
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)

    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: median[name] / median["convert"] for name in ("disk", "fhir")}
    print(f"instances: {args.n} in {args.series} series (output file {size / 1e6:.2f} MB), "
          f"median of {args.repeat} interleaved runs")
    print(f"convert_study from headers (baseline):          {median['convert'] * 1000:8.1f} ms")
    print(f"disk sink: write_study into its own output:      {median['disk'] * 1000:8.1f} ms  "
          f"(ratio {ratios['disk']:.2f})")
    print(f"FHIR sink: merge into the server's copy, check:  {median['fhir'] * 1000:8.1f} ms  "
          f"(ratio {ratios['fhir']:.2f})")
    ok = all(ratio <= TARGET_RATIO for ratio in ratios.values())
    print(f"for information: validate_resources (the edge): {median['validate'] * 1000:8.1f} ms  "
          f"(paid when a changed study is written or sent)")
    print(f"target: merge <= {TARGET_RATIO:g} x convert (about 6.5 x before dicts): {'OK' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
