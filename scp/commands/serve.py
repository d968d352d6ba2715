"""Run the Storage SCP node: receive studies over DICOM and turn each completed study into FHIR.

The node answers C-ECHO and C-STORE for every storage SOP class, in every transfer
syntax (compressed included). Each instance's header is stored in the spool (fsync'ed)
before the success status goes back. A study is complete when none of its instances
arrived for --idle-timeout seconds; it is then converted and written to
OUTPUT/<StudyInstanceUID>.json (merged with an earlier part) and, with --fhir-url, sent
to the FHIR server. Studies left in the spool are delivered after a restart.

Settings come from --config (TOML, see config/dicom-fhir-scp.toml); flags override it.
SIGTERM or Ctrl-C stops the node gracefully: no new associations, the instance in flight
may finish within node.stop_grace (10 s), the rest are aborted, the spool is kept. A second
SIGTERM or Ctrl-C exits at once (nothing acknowledged is lost either way).

Settings may also come from DICOM_FHIR_SCP_<SECTION>_<KEY> environment variables
(e.g. DICOM_FHIR_SCP_NODE_PORT=104; DICOM_FHIR_SCP_CONFIG names the file):
flag > environment > file > default.

Exit status: 0 after a graceful stop; 2 on a user error (bad configuration, a folder
that cannot be used, a port in use), reported in one line.

examples:
  dicom-fhir-scp serve
  dicom-fhir-scp serve 11112                 # the port, as storescp takes it
  dicom-fhir-scp serve --config /etc/dicom-fhir-scp/dicom-fhir-scp.toml
  dicom-fhir-scp serve --port 11112 -aet FHIRSCP -od /data/fhir --idle-timeout 60 -v
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports the configuration lazily (start-up time)
    from scp.config import Config

log = logging.getLogger("scp.commands.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("port_argument", nargs="?", type=int, metavar="PORT",
                        help="TCP port to listen on, as storescp takes it (same as --port)")
    parser.add_argument("-c", "--config", metavar="FILE", type=Path,
                        help="TOML configuration file (default: $DICOM_FHIR_SCP_CONFIG, else none)")
    net = parser.add_argument_group("network (override [node] from --config)")
    net.add_argument("--port", type=int, metavar="PORT", help="TCP port to listen on (default: 11112)")
    net.add_argument("-aet", "--ae-title", metavar="AETITLE", help="the node's AE title (default: FHIRSCP)")
    net.add_argument("--bind", metavar="ADDRESS", help="address to listen on (default: every interface)")
    net.add_argument("--workers", type=int, metavar="N",
                     help="receive in N processes sharing the port (default: one per CPU; 1: this process)")
    store = parser.add_argument_group("storage (override [node] from --config)")
    store.add_argument("-od", "--output-dir", metavar="DIR", type=Path,
                       help="write <StudyInstanceUID>.json here (default: ./fhir-output)")
    store.add_argument("--spool-dir", metavar="DIR", type=Path,
                       help="received instance headers, kept until delivered (default: ./spool)")
    store.add_argument("--dead-letter-dir", metavar="DIR", type=Path,
                       help="studies that could not be delivered (default: ./dead-letter)")
    store.add_argument("--archive-dir", metavar="DIR", type=Path,
                       help="also keep the complete instances (pixel data included) here")
    store.add_argument("--idle-timeout", metavar="SECONDS", type=float,
                       help="a study is complete after this many seconds without a new instance (default: 30)")
    store.add_argument("--accept-unknown-sop-classes", action="store_true", default=None,
                       help="also accept private and unknown storage SOP classes")
    parser.add_argument("--fhir-url", metavar="URL", help="also deliver to this FHIR R4 server (overrides [fhir] url)")
    parser.add_argument("--fhir-version", choices=("R4", "R5"), default=None,
                        help="FHIR release to write and to expect of the FHIR server's /metadata "
                             "(default: R4, or fhir.version from --config)")


def load(args: argparse.Namespace):
    """The configuration: defaults, the file, the environment, then the flags."""
    from scp.config import load_config, override

    config = load_config(args.config)
    config = override(config, "node", port=_port(args), ae_title=args.ae_title, bind=args.bind,
                      workers=getattr(args, "workers", None),
                      output_dir=args.output_dir, spool_dir=args.spool_dir, dead_letter_dir=args.dead_letter_dir,
                      archive_dir=args.archive_dir, idle_timeout=args.idle_timeout,
                      accept_unknown_sop_classes=args.accept_unknown_sop_classes)
    return override(config, "fhir", url=args.fhir_url, version=args.fhir_version)


def _port(args: argparse.Namespace) -> int | None:
    """PORT (positional, as storescp) or --port; both is fine when they agree."""
    from mapping.errors import ConfigurationError

    positional = getattr(args, "port_argument", None)
    if positional is not None and args.port is not None and positional != args.port:
        raise ConfigurationError(f"serve: two different ports given, PORT {positional} and --port {args.port}")
    return args.port if args.port is not None else positional


def check_folders(node) -> None:
    """Every folder the node writes, created or refused (one clear line) before anything listens."""
    from scp.store.folders import ensure_folder

    ensure_folder(node.spool_dir, "node.spool_dir (--spool-dir)")
    ensure_folder(node.dead_letter_dir, "node.dead_letter_dir (--dead-letter-dir)")
    if node.output_dir is not None:
        ensure_folder(node.output_dir, "node.output_dir (-od, --output-dir)")
    if node.archive_dir is not None:
        ensure_folder(node.archive_dir, "node.archive_dir (--archive-dir)")


def claim_spool(node):
    """The spool's lock (scp.store.spool.SpoolLock), held while the node runs: a second node on
    the same spool stops here, in one line naming the first one's PID, before it touches anything."""
    from scp.store.spool import SpoolLock

    return SpoolLock.acquire(node.spool_dir, "node.spool_dir (--spool-dir)")


def warn_about_mapping(options) -> list[str]:
    """Warnings for mapping settings left unset whose absence costs data (logged at start)."""
    warnings = []
    if options.timezone is None:
        warnings.append("mapping.timezone is not set: DICOM times without TimezoneOffsetFromUTC are dropped, so "
                        "ImagingStudy.started and series/instance times keep the date only "
                        "(set the senders' IANA zone, e.g. timezone = \"Europe/Berlin\")")
    if options.patient_identifier_system is None and not options.use_issuer_of_patient_id:
        warnings.append("mapping.patient_identifier_system is not set (and use_issuer_of_patient_id is off): "
                        "Patient.identifier has no system, so patients of different issuers with the same "
                        "PatientID cannot be told apart (set your MRN namespace, e.g. \"urn:oid:1.2.3.4\")")
    return warnings


def warn_about_senders(config: Config) -> list[str]:
    """Warnings for a [[senders]] set-up that refuses every sender (logged at start).

    A warning, not an error: closing the node to everyone (while the entries are being
    written, or to stop a flood) is a thing an administrator may mean."""
    if not config.security.allow_unknown_senders and not config.senders:
        return ["security.allow_unknown_senders = false and no [[senders]] entry: every association will be "
                "refused (calling AE title not recognized); add an entry per sender or set it to true"]
    return []


def run(args: argparse.Namespace) -> int:
    from mapping.errors import ConfigurationError
    from scp.ops.metrics import Metrics
    from scp.node import Node
    from scp.ops.http import start_ops_server

    config = load(args)
    check_folders(config.node)
    spool_lock = claim_spool(config.node)  # released when the process ends, however it ends
    for warning in warn_about_mapping(config.mapping) + warn_about_senders(config):
        log.warning("%s", warning)
    metrics = Metrics()
    node = Node(config, metrics=metrics)
    node.check_fhir_servers()  # a server of another FHIR version: exit 2 before anything listens
    stop = threading.Event()

    def request_stop(signum, _frame) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            # A second signal: exit now. Safe for what was acknowledged: every success was sent
            # only after its instance was fsync'ed; the rest is resent by its sender.
            log.warning("%s received again: exiting at once", name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s received: stopping; the instance in flight may finish within %g s (node.stop_grace); "
                 "send it again to exit at once", name, config.node.stop_grace)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        host, port = node.start()
    except OSError as exc:
        node.stop()
        raise ConfigurationError(f"node.port (--port): cannot listen on {config.node.bind or '*'}:"
                                 f"{config.node.port}: {exc.strerror or exc}") from exc
    try:
        ops = start_ops_server(config.operations, metrics, node.readiness)  # does nothing when disabled
    except BaseException:
        node.stop()
        raise
    # Last, after every listener: whoever waits for "ready" may connect to all of them.
    log.info("node %s ready on %s:%d%s", config.node.ae_title, host or "*", port,
             f", operations endpoint on port {ops.port}" if ops.port is not None else "")
    try:
        while not stop.wait(3600):
            pass
    finally:
        ops.stop()
        node.stop()
        spool_lock.release()
    return 0
