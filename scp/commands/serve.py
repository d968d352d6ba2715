"""Run the Storage SCP node: receive studies over DICOM and turn each completed study into FHIR.

The node answers C-ECHO and C-STORE for every storage SOP class, in every transfer
syntax (compressed included). Each instance's header is stored in the spool (fsync'ed)
before the success status goes back. A study is complete when none of its instances
arrived for --idle-timeout seconds; it is then converted and written to
OUTPUT/<StudyInstanceUID>.json (merged with an earlier part) and, with --fhir-url, sent
to the FHIR server. Studies left in the spool are delivered after a restart.

Settings come from --config (TOML, see config/dicom-fhir-scp.toml); flags override it.
SIGTERM or Ctrl-C stops the node gracefully (the instance in flight is finished, the
spool is kept).

examples:
  dicom-fhir-scp serve
  dicom-fhir-scp serve --config /etc/dicom-fhir-scp/dicom-fhir-scp.toml
  dicom-fhir-scp serve --port 11112 -aet FHIRSCP -od /data/fhir --idle-timeout 60 -v
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

log = logging.getLogger("scp.commands.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", type=Path, help="TOML configuration file")
    net = parser.add_argument_group("network (override [node] from --config)")
    net.add_argument("--port", type=int, metavar="PORT", help="TCP port to listen on (default: 11112)")
    net.add_argument("-aet", "--ae-title", metavar="AETITLE", help="the node's AE title (default: FHIRSCP)")
    net.add_argument("--bind", metavar="ADDRESS", help="address to listen on (default: every interface)")
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


def load(args: argparse.Namespace):
    """The configuration: file (or defaults), then the flags."""
    from scp.config import load_config, override

    config = load_config(args.config)
    config = override(config, "node", port=args.port, ae_title=args.ae_title, bind=args.bind,
                      output_dir=args.output_dir, spool_dir=args.spool_dir, dead_letter_dir=args.dead_letter_dir,
                      archive_dir=args.archive_dir, idle_timeout=args.idle_timeout,
                      accept_unknown_sop_classes=args.accept_unknown_sop_classes)
    return override(config, "fhir", url=args.fhir_url)


def run(args: argparse.Namespace) -> int:
    from scp.ops.metrics import Metrics
    from scp.node import Node
    from scp.ops.http import start_ops_server

    config = load(args)
    metrics = Metrics()
    node = Node(config, metrics=metrics)
    stop = threading.Event()

    def request_stop(signum, _frame) -> None:
        log.info("%s received: stopping after the instance in flight", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        node.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.node.bind or "*", config.node.port, exc)
        return 1
    ops = start_ops_server(config.operations, metrics, node.readiness)  # does nothing when disabled
    try:
        while not stop.wait(3600):
            pass
    finally:
        ops.stop()
        node.stop()
    return 0
