"""`dicom-fhir-scp` command line: one subcommand per module in scp.commands.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int``
and keeps heavy imports inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from scp import __version__
from scp.logs import FORMATS, configure
from mapping.errors import DicomFhirError

COMMANDS = {
    "serve": "run the Storage SCP node",
    "convert": "convert a folder of DICOM files to FHIR (no network)",
    "retry": "send dead-lettered studies again",
    "status": "show studies waiting in the spool, dead-lettered and recently delivered",
    "sync": "pull studies from a DICOMweb server into FHIR (backfill, --follow)",
}

log = logging.getLogger("scp.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-fhir-scp",
        description="Receive DICOM studies (C-STORE) and turn them into FHIR R4 (or R5) ImagingStudy, Patient and Endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"scp.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        verbosity = p.add_mutually_exclusive_group()
        verbosity.add_argument("-q", "--quiet", action="store_true", help="quiet mode, print warnings and errors only")
        verbosity.add_argument("-v", "--verbose", action="store_true", help="verbose mode, print processing details")
        verbosity.add_argument("-d", "--debug", action="store_true", help="debug mode, print debug information")
        p.add_argument("--log-format", choices=FORMATS, default=None,
                       help="text (default) or json: one JSON object per line (overrides logging.format)")
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    configure(log_format(args), level)  # warnings (pydicom's) become log lines too: scp.logs
    if not args.debug:
        # pynetdicom logs every PDU at INFO/DEBUG; keep its chatter for -d.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING if not args.verbose else logging.INFO)
        # pydicom logs each warning it also raises with the warnings module: once is enough,
        # and the warning is the one that can be attributed to a file.
        logging.getLogger("pydicom").setLevel(logging.ERROR)


def log_format(args: argparse.Namespace) -> str:
    """--log-format, else logging.format of the command's configuration, else text.

    Read before the command runs so that its first line is already in the chosen format.
    A configuration that does not load gives text here: the command loads it again and
    reports the error itself (in text, the only format known at that point).
    """
    if args.log_format is not None:
        return args.log_format
    from scp.config import load_config

    try:
        return load_config(getattr(args, "config", None)).logging.format
    except DicomFhirError:
        return "text"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args)
    try:
        return int(args._module.run(args) or 0)
    except DicomFhirError as exc:  # a user error (configuration, folders, ports): one line, no traceback
        log.error("%s", exc)
        return 2
    except OSError as exc:  # the file system or the network refused: also the user's to fix
        log.error("%s", exc)
        log.debug("details", exc_info=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
