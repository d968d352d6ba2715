"""Benchmark: delivering one large study to the validating FHIR engine with scp.fhir_sink.

    .venv/bin/python benchmarks/deliver.py [--n 2000] [--series 4] [--repeat 3] [--dicomweb URL]

Generates one study of N real CT headers (tests.dicomgen), converts it with the
mapping, starts the FHIR engine (tests/fhir_server, Medplum's engine validating every
write), then measures, best of REPEAT runs each on an emptied server:

  bare      one hand-made POST of the same transaction Bundle (json.dumps + requests):
            the floor, what the engine itself costs to receive, validate and store it
  first     FhirSink.deliver of the new study (search, then the transaction)
  resend    the same study delivered again (search, nothing changed, nothing sent)
  part 2    the study in two halves: the second half's delivery (search, merge, PUT)

and prints requests, bytes sent, time per scenario and the ratio first/bare time.
For comparison, DICOM Cast sends 4 requests per instance (4 x N for this study).

Targets: first delivery <= 3 requests, a resend 1 request, a further part 2 requests,
first/bare time <= 1.5. Exit status 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
import requests  # noqa: E402

from mapping import MappingOptions, StudyResources, convert_study, render  # noqa: E402
from scp.config import FhirConfig  # noqa: E402
from scp.fhir_sink import FhirSink  # noqa: E402
from tests.dicomgen import generate_study  # noqa: E402
from tests.fhir_engine import FhirEngine  # noqa: E402

TARGET_RATIO = 1.5
TARGET_REQUESTS = {"first": 3, "resend": 1, "part 2": 2}


def read_study(folder: Path, options: MappingOptions) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.iterdir())]


def bare_post(engine: FhirEngine, resources: StudyResources) -> None:
    data = json.dumps(render(resources, "bundle"), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    response = requests.post(engine.base_url, data=data, timeout=600,
                             headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"})
    response.raise_for_status()


def measure(engine: FhirEngine, repeat: int, prepare: Callable[[], None], run: Callable[[], None]) -> dict:
    """Best of ``repeat`` runs of ``run`` (each after ``prepare`` on an emptied server)."""
    best = None
    for _ in range(repeat):
        engine.reset()
        prepare()
        engine.reset_stats()
        started = time.perf_counter()
        run()
        elapsed = time.perf_counter() - started
        stats = engine.stats()
        figures = {"time": elapsed, "requests": stats["requests"], "bytes": stats["bytesReceived"],
                   "calls": [f"{e['method']} {e['path'].split('?')[0]} {e['status']}" for e in stats["log"]]}
        if best is None or elapsed < best["time"]:
            best = figures
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="instances (default 2000)")
    parser.add_argument("--series", type=int, default=4, help="series (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each scenario (default 3)")
    parser.add_argument("--dicomweb", default="https://pacs.example/dicomweb",
                        help="DICOMweb base URL, so an Endpoint is created too ('' for none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = MappingOptions(patient_identifier_system="http://hospital.example/mrn",
                             dicomweb_url=args.dicomweb or None)

    with tempfile.TemporaryDirectory(prefix="bench-deliver-") as tmp:
        generate_study(Path(tmp), args.n, args.series)
        datasets = read_study(Path(tmp), options)
    started = time.perf_counter()
    whole = convert_study(datasets, options)
    convert_time = time.perf_counter() - started
    half = len(datasets) // 2
    first_half, second_half = convert_study(datasets[:half], options), convert_study(datasets[half:], options)
    bundle_bytes = len(json.dumps(render(whole, "bundle"), ensure_ascii=False, separators=(",", ":")).encode())

    with FhirEngine.start() as engine:
        sink = FhirSink(FhirConfig(url=engine.base_url, timeout=600), options)
        nothing = lambda: None  # noqa: E731
        bare_post(engine, whole)  # warm up the engine (JIT, first validation)
        results = {
            "bare": measure(engine, args.repeat, nothing, lambda: bare_post(engine, whole)),
            "first": measure(engine, args.repeat, nothing, lambda: sink.deliver(whole)),
            "resend": measure(engine, args.repeat, lambda: sink.deliver(whole), lambda: sink.deliver(whole)),
            "part 2": measure(engine, args.repeat, lambda: sink.deliver(first_half),
                              lambda: sink.deliver(second_half)),
        }
        stored = engine.resources("ImagingStudy")
        if len(stored) != 1 or stored[0].get("numberOfInstances") != args.n:
            print(f"benchmark: the server does not hold the whole study: {[s.get('numberOfInstances') for s in stored]}")
            return 1

    print(f"study: {args.n} instances in {args.series} series; transaction Bundle {bundle_bytes / 1e6:.2f} MB; "
          f"convert_study {convert_time:.3f} s; best of {args.repeat} runs; engine: Medplum validating every write")
    print(f"{'scenario':10} {'requests':>8} {'bytes sent':>12} {'time':>9}  calls")
    for name, r in results.items():
        print(f"{name:10} {r['requests']:8d} {r['bytes']:12,d} {r['time']:8.3f}s  {', '.join(r['calls'])}")
    print(f"DICOM Cast for the same study: {4 * args.n} requests (4 per instance)")
    ok = True
    for name, limit in TARGET_REQUESTS.items():
        met = results[name]["requests"] <= limit
        ok &= met
        print(f"{name}: {results[name]['requests']} requests (target <= {limit}): {'OK' if met else 'MISSED'}")
    ratio = results["first"]["time"] / results["bare"]["time"]
    ok &= ratio <= TARGET_RATIO
    print(f"ratio first delivery/bare POST time: {ratio:.2f}  (target <= {TARGET_RATIO}): "
          f"{'OK' if ratio <= TARGET_RATIO else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
