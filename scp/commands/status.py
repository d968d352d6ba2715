"""Show what the node holds: studies waiting in the spool, dead-lettered studies
and the most recent deliveries.

Reads the folders of the configuration (or the ones given) and nothing else: it
works while the node runs (it takes no lock: the spool's lock is the node's), needs
no network and never changes anything. Spool entries the node could not read are
listed as quarantined, with their reason. Studies
are named by StudyInstanceUID; no patient names or IDs are shown.

Waiting studies are listed by the time of their last instance (oldest first);
a study completes when it has been idle for node.idle_timeout seconds, so a study
idle much longer than that is waiting for a delivery that keeps failing (see the
node's log). Dead-lettered studies need a person: fix the cause, then run
`dicom-fhir-scp retry`.

Exit status: 0, or 2 on a configuration error.

examples:
  dicom-fhir-scp status --config /etc/dicom-fhir-scp/dicom-fhir-scp.toml
  dicom-fhir-scp status --spool-dir /var/lib/dicom-fhir-scp/spool --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", type=Path,
                        help="TOML configuration; node.spool_dir and node.dead_letter_dir are read from it")
    parser.add_argument("--spool-dir", metavar="DIR", type=Path,
                        help="spool folder (default: node.spool_dir, ./spool)")
    parser.add_argument("--dead-letter-dir", metavar="DIR", type=Path,
                        help="dead-letter folder (default: node.dead_letter_dir, ./dead-letter)")
    parser.add_argument("-n", "--recent", metavar="N", type=_count, default=10,
                        help="show the last N deliveries (default: 10)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    import time

    from scp.config import load_config, override
    from scp.ops.status import build_report, format_report

    config = override(load_config(args.config), "node",
                      spool_dir=args.spool_dir, dead_letter_dir=args.dead_letter_dir)
    report = build_report(config.node.spool_dir, config.node.dead_letter_dir, now=time.time(), recent=args.recent)
    syncs = sync_status(config.node.spool_dir, time.time())
    if args.json:
        sys.stdout.write(json.dumps({**report.to_json(), **({"sync": syncs} if syncs else {})},
                                    indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n".join(format_report(report) + format_sync(syncs)) + "\n")
    return 0


def sync_status(spool_dir: Path, now: float) -> list[dict]:
    """Each `sync` checkpoint in the spool: its source, progress and lag (seconds since its last change
    or, before any, since the checkpoint was written)."""
    from scp.sources.dicomweb.checkpoint import all_checkpoints

    result = []
    for state in all_checkpoints(spool_dir):
        newest = state.last_change or state.updated
        result.append({"source": state.source, "windows_done": len(state.windows_done),
                       "undated_done": state.undated_done, "studies": len(state.studies),
                       "failed": sorted(state.failed), "backfill_finished": state.backfill_finished,
                       "changes_since": state.changes_since, "updated": state.updated,
                       "lag_seconds": None if newest is None else round(max(now - newest, 0.0), 1)})
    return result


def format_sync(syncs: list[dict]) -> list[str]:
    lines = []
    for s in syncs:
        done = "backfill finished" if s["backfill_finished"] else "backfill in progress"
        lines.append(f"sync from {s['source']}: {done}, {s['windows_done']} window(s) done, "
                     f"{s['studies']} study(ies) delivered, {len(s['failed'])} failed"
                     + (f", Orthanc /changes at {s['changes_since']}" if s["changes_since"] is not None else "")
                     + (f", last change {s['lag_seconds']:.0f} s ago" if s["lag_seconds"] is not None else ""))
    return lines


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value
