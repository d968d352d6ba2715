"""Convert a folder of DICOM files to FHIR R4 (or R5: --fhir-version R5), without the network.

Reads every file under DIR (recursively; headers only, never pixel data), groups
the instances by StudyInstanceUID and writes one JSON file per study,
OUT/<StudyInstanceUID>.json, merging with a file already there (re-running, or
converting a second part of a study, never loses data). Files that are not usable
DICOM instances are skipped with a warning naming the file and the reason.

Exit status: 0 when at least one study was written, 1 when nothing could be
converted, 2 on a user error (configuration, a folder that is missing or unusable),
reported in one line.

convert never touches a node's spool, so it may run beside a node; OUT may be a running
node's output folder: each file is merged under its lock (.<StudyInstanceUID>.json.lock),
as the node merges it.

examples:
  dicom-fhir-scp convert /media/cdrom -od ./fhir-output
  dicom-fhir-scp convert /media/cdrom ./fhir-output      # OUT as a second argument
  dicom-fhir-scp convert studies/ --shape contained --timezone Europe/Berlin
  dicom-fhir-scp convert /media/cdrom -o ./fhir-r5 --fhir-version R5
  dicom-fhir-scp convert /media/cdrom -od ./fhir-output --jobs 1   # one process only
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

log = logging.getLogger("scp.commands.convert")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="DIR", type=Path,
                        help="folder of DICOM files (searched recursively), or a single file")
    parser.add_argument("output_argument", nargs="?", metavar="OUT", type=Path,
                        help="same as -od (a second argument, as dcmtk's converters take it)")
    parser.add_argument("-od", "-o", "--output-dir", metavar="OUT", type=Path, default=None,
                        help="write one <StudyInstanceUID>.json per study here (default: ./fhir-output)")
    parser.add_argument("--shape", choices=("bundle", "contained"), default=None,
                        help="bundle: a FHIR transaction Bundle (default, or node.shape from --config); "
                             "contained: one ImagingStudy with the Patient contained")
    parser.add_argument("-c", "--config", metavar="FILE", type=Path,
                        help="TOML configuration; its [mapping] and [convert] sections apply")
    parser.add_argument("--fhir-version", choices=("R4", "R5"), default=None,
                        help="FHIR release to write (default: R4, or fhir.version from --config)")
    parser.add_argument("-j", "--jobs", metavar="N", type=int, default=None,
                        help="processes reading the files' headers (default: convert.jobs from --config, "
                             "else one per CPU; 1: no worker processes). The output is the same for any N")
    mapping = parser.add_argument_group("mapping options (override [mapping] from --config)")
    mapping.add_argument("--timezone", metavar="ZONE",
                         help="IANA time zone of DICOM times without TimezoneOffsetFromUTC, e.g. Europe/Berlin "
                              "(without it: date precision only)")
    mapping.add_argument("--dicomweb-url", metavar="URL",
                         help="DICOMweb root URL: adds an Endpoint referenced by each ImagingStudy")
    mapping.add_argument("--patient-identifier-system", metavar="URI",
                         help="system of Patient.identifier (the PatientID)")


def run(args: argparse.Namespace) -> int:
    from mapping.errors import ConfigurationError
    from scp.config import load_config, override
    from scp.sources.folder import convert_files, list_files, write_studies
    from scp.sources.parallel import default_jobs
    from scp.store.folders import ensure_folder

    config = load_config(args.config)
    config = override(config, "mapping", timezone=args.timezone, dicomweb_url=args.dicomweb_url,
                       patient_identifier_system=args.patient_identifier_system)
    config = override(config, "fhir", version=args.fhir_version)
    config = override(config, "convert", jobs=args.jobs)
    shape = args.shape or config.node.shape
    jobs = config.convert.jobs or default_jobs()
    output_dir = _output_dir(args)
    if not args.source.exists():
        raise ConfigurationError(f"convert: {args.source}: no such file or folder")
    ensure_folder(output_dir, "convert -od")
    files = list_files(args.source, exclude=output_dir)
    log.info("converting %d file(s) under %s to %s (shape %s, FHIR %s, %d job(s))", len(files), args.source,
             output_dir, shape, config.mapping.fhir_version, jobs)
    with _progress_bar(len(files)) as advance:
        report = convert_files(files, config.mapping, progress=advance, jobs=jobs)
    write_studies(report, output_dir, shape)
    for line in report.summary():
        log.info("%s", line)
    return 0 if report.written else 1


def _output_dir(args: argparse.Namespace) -> Path:
    """OUT (positional) or -od; both is fine when they agree."""
    from mapping.errors import ConfigurationError

    if args.output_argument is not None and args.output_dir is not None and args.output_argument != args.output_dir:
        raise ConfigurationError(f"convert: two different output folders given, OUT {args.output_argument} "
                                 f"and -od {args.output_dir}")
    return args.output_dir or args.output_argument or Path("fhir-output")


@contextlib.contextmanager
def _progress_bar(total: int):
    """A tqdm bar on a terminal only; log lines are routed around it while it is shown."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True) as bar, logging_redirect_tqdm():
        yield lambda _path: bar.update()
