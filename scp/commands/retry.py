"""Send dead-lettered studies again, once the cause is fixed.

A study is set aside in the dead-letter folder when a sink refused it for good (the
FHIR server answered 4xx: an invalid resource, wrong credentials, a duplicate master
record...) or its instances disagree on PatientID. Its folder holds reason.txt and
the server's answer (outcome.json) next to the Bundle that was sent (bundle.json);
`dicom-fhir-scp status` lists them.

Fix the cause (the configuration, the server's data, the sender's data), then run
this command: each study named (or every one, with --all) is converted again from its
kept instance headers with the current configuration and delivered to each of its
destinations (the disk sink, the FHIR servers, as the node does; [[senders]]
destinations apply) that has not taken it yet: a destination listed in the folder's
delivered.json (it took the study when another refused it) is never sent it again. A delivered study leaves the
dead-letter folder and is recorded in the spool's deliveries.jsonl; a study still
refused keeps its folder, with the new reason and documents; a study the server could
not take right now (down, 5xx, 429) is kept unchanged. The node's end-of-study hook
([hooks] on_delivered) runs after each study delivered, as in the node; its failure
changes nothing here (logged, like the node).

With --requeue the instances go back into the spool instead, and the node delivers
them when it next starts (use this while the node is stopped, to let it retry with
backoff itself). It takes the spool's lock while it moves them: on the spool of a
running node it refuses (exit 2, naming the node's PID), and a node started meanwhile
refuses to start until it is done. Without --requeue, retry may
run beside the node: it reads and writes the dead-letter folder and appends to the
journal, as the node does, and merges disk output under each file's lock. The spool keeps no per-destination record: a requeued study goes to
every one of its destinations again, also to those in its delivered.json (a sink merges
what it already holds, so nothing changes there, but it is sent); the command names
them. To send it only where it was refused, retry without --requeue.

Studies are named by StudyInstanceUID; no patient names or IDs are printed.

Exit status: 0 when every study named was delivered (or requeued), 1 when one was not,
2 on a user error (configuration, a folder that cannot be used, an unknown study UID).

examples:
  dicom-fhir-scp retry --config /etc/dicom-fhir-scp/dicom-fhir-scp.toml --all
  dicom-fhir-scp retry -c node.toml 1.2.840.113619.2.55.3.604688119.971.1268753371.23
  dicom-fhir-scp retry --dead-letter-dir /var/lib/dicom-fhir-scp/dead-letter --fhir-url https://fhir.example/r4 --all
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("scp.commands.retry")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("studies", nargs="*", metavar="UID", help="StudyInstanceUID of a dead-lettered study")
    parser.add_argument("--all", action="store_true", help="every study in the dead-letter folder, oldest first")
    parser.add_argument("-c", "--config", metavar="FILE", type=Path,
                        help="TOML configuration (the node's: sinks, mapping options, folders)")
    parser.add_argument("--dead-letter-dir", metavar="DIR", type=Path,
                        help="dead-letter folder (default: node.dead_letter_dir, ./dead-letter)")
    parser.add_argument("--spool-dir", metavar="DIR", type=Path,
                        help="spool folder, for deliveries.jsonl and --requeue (default: node.spool_dir, ./spool)")
    parser.add_argument("-od", "--output-dir", metavar="DIR", type=Path,
                        help="disk sink folder (default: node.output_dir, ./fhir-output)")
    parser.add_argument("--fhir-url", metavar="URL", help="FHIR R4 server (overrides [fhir] url)")
    parser.add_argument("--requeue", action="store_true",
                        help="move the instances back into the spool for the node's next start instead")


def run(args: argparse.Namespace) -> int:
    from mapping.errors import ConfigurationError
    from scp.config import load_config, override
    from scp.errors import DeliveryRejected, DeliveryRetryable
    from scp.node import default_sinks, study_route
    from scp.pipeline.delivery import redeliver
    from scp.pipeline.hooks import delivered_from_report, hook_runner
    from scp.senders import SenderTable
    from scp.store.dead_letter import DeadLetterBox
    from scp.store.journal import Journal
    from scp.store.spool import FileSpool, SpoolLock

    if bool(args.studies) == bool(args.all):
        raise ConfigurationError("retry: name the studies (StudyInstanceUID ...) or give --all, not both")
    config = override(load_config(args.config), "node", dead_letter_dir=args.dead_letter_dir,
                      spool_dir=args.spool_dir, output_dir=args.output_dir)
    config = override(config, "fhir", url=args.fhir_url)
    _check_folders(config.node, requeue=args.requeue)
    box = DeadLetterBox(config.node.dead_letter_dir)
    uids = [letter.study_uid for letter in box.list()] if args.all else list(dict.fromkeys(args.studies))
    for uid in uids:
        try:
            if not box.contains(uid):
                raise KeyError(uid)
        except (KeyError, ValueError):
            raise ConfigurationError(f"retry: study {uid} is not in the dead-letter folder "
                                     f"{config.node.dead_letter_dir}") from None
    if not uids:
        print(f"no dead-lettered studies in {config.node.dead_letter_dir}")
        return 0

    spool_dir = Path(config.node.spool_dir)
    if args.requeue:
        # The spool's lock while moving instances in: the node must not start (and recover,
        # resume, remove) halfway through, nor run meanwhile.
        with SpoolLock.acquire(spool_dir, "retry --requeue: node.spool_dir (--spool-dir)",
                               "stop the node first (it picks the study up when it starts), "
                               "or retry without --requeue while it runs"):
            _requeue(uids, box, FileSpool(spool_dir), spool_dir)
        return 0
    sinks = default_sinks(config)
    if not sinks:
        raise ConfigurationError("retry: no sink configured (set node.output_dir or fhir.url, or --fhir-url)")
    hook = hook_runner(config.hooks)  # the node's end-of-study hook, checked before anything is sent
    spool_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal.in_spool(spool_dir, max_bytes=config.node.journal_max_bytes)
    senders = SenderTable.from_config(config)  # as the node maps: each study with its senders' options
    failed = 0
    for uid in uids:
        try:
            report = redeliver(uid, sinks, dead_letters=box, journal=journal, senders=senders,
                               route=study_route(config))
        except DeliveryRejected as exc:
            failed += 1
            print(f"study {uid}: still refused, kept in {box.folder(uid)}: {exc}")
        except DeliveryRetryable as exc:
            failed += 1
            print(f"study {uid}: not delivered now, kept in {box.folder(uid)} (try again later): {exc}")
        else:
            where = "; ".join(f"{name}: {result}" for name, result in report.sinks.items())
            print(f"study {uid}: delivered, {report.instances} instance(s) in {report.series} series -> {where}")
            sys.stdout.flush()
            if hook is not None:  # here, one at a time: this command ends when its hooks have run
                hook.run(delivered_from_report(report, config.node.output_dir))
        sys.stdout.flush()
    if len(uids) > 1:
        print(f"{len(uids) - failed} of {len(uids)} study(ies) delivered")
    return 1 if failed else 0


def _requeue(uids: list[str], box, spool, spool_dir: Path) -> None:
    for uid in uids:
        took = box.delivered(uid)
        moved = box.requeue(uid, spool)
        print(f"study {uid}: {moved} instance(s) back in the spool {spool_dir}; delivered when the node starts")
        if took:
            print(f"study {uid}: note: {', '.join(took)} already took it; the node sends it there again "
                  f"(merged, nothing changes there)")


def _check_folders(node, *, requeue: bool) -> None:
    """The folders retry writes, created or refused in one line before any study is touched."""
    from scp.store.folders import ensure_folder

    ensure_folder(node.spool_dir, "node.spool_dir (--spool-dir)")
    if node.output_dir is not None and not requeue:
        ensure_folder(node.output_dir, "node.output_dir (-od, --output-dir)")
