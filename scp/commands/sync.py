"""Pull studies from a DICOMweb server (QIDO-RS / WADO-RS) into FHIR: backfill, then --follow.

Lists the server's studies by StudyDate window (--since .. --until, in windows of
--window-days; a window that reaches --page-size results is split), fetches each study's
metadata (WADO-RS /studies/{uid}/metadata, DICOM JSON; bulk data never fetched), maps it
with the same rules as the node and delivers it to the same destinations (-od, --fhir-url,
[fhir.destinations]). Studies without a StudyDate are found by a separate full listing.
A checkpoint in the spool folder (SPOOL/sync/) makes a stopped or killed run resume
without listing finished windows again; a study delivered before and unchanged is neither
fetched nor sent. A study that cannot be delivered goes to the dead letter with its reason
and is tried again on the next run.

--follow keeps running: with --orthanc-url it reads Orthanc's /changes feed (a study is
delivered when Orthanc reports it stable; Deleted changes propagate), otherwise it polls
the last --recent-days of StudyDate every --poll-interval seconds (a study whose series or
instance count changed is fetched again and merged; one gone from a window that was fully
listed is removed, per sync.on_delete).

Settings come from [sync] in --config (every key also a flag, and DICOM_FHIR_SCP_SYNC_<KEY>).

Exit status: 0 when every study was delivered; 1 when some failed (dead letter) or the
server could not be listed; 2 on a user error.

examples:
  dicom-fhir-scp sync --dicomweb-url http://pacs:8042/dicom-web -od ./fhir-output
  dicom-fhir-scp sync --dicomweb-url https://pacs/dicom-web --auth bearer --token-env PACS_TOKEN \\
      --fhir-url https://fhir.example/R4 --since 2020-01-01 --until 2020-12-31
  dicom-fhir-scp sync -c /etc/dicom-fhir-scp/dicom-fhir-scp.toml --follow --orthanc-url http://pacs:8042
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("scp.commands.sync")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", type=Path,
                        help="TOML configuration file (default: $DICOM_FHIR_SCP_CONFIG, else none)")
    source = parser.add_argument_group("the DICOMweb server (override [sync] from --config)")
    source.add_argument("--dicomweb-url", metavar="URL", help="QIDO-RS / WADO-RS root (sync.dicomweb_url)")
    source.add_argument("--auth", choices=("none", "bearer", "basic", "oauth2"), help="sync.auth")
    source.add_argument("--token", metavar="TOKEN", help="bearer token (sync.token; prefer --token-env)")
    source.add_argument("--token-env", metavar="VAR", help="read the bearer token from this environment variable")
    source.add_argument("--username", metavar="NAME", help="basic auth user (sync.username)")
    source.add_argument("--password-env", metavar="VAR", help="read the basic auth password from this variable")
    source.add_argument("--token-url", metavar="URL", help="OAuth2 token endpoint (sync.token_url)")
    source.add_argument("--client-id", metavar="ID", help="OAuth2 client id (sync.client_id)")
    source.add_argument("--client-secret-env", metavar="VAR", help="read the OAuth2 client secret from this variable")
    source.add_argument("--scope", metavar="SCOPE", help="OAuth2 scope (sync.scope)")
    source.add_argument("--timeout", type=float, metavar="SECONDS", help="per request (sync.timeout)")
    source.add_argument("--max-response-bytes", type=int, metavar="N", help="sync.max_response_bytes")
    source.add_argument("--rate-limit", type=float, metavar="PER_SECOND", help="requests/s, 0 = unlimited")
    source.add_argument("--parallel", type=int, metavar="N", help="studies fetched and delivered at once")
    source.add_argument("--retries", type=int, metavar="N", help="attempts per request (sync.retries)")
    window = parser.add_argument_group("what to sync")
    window.add_argument("--since", metavar="DATE", help="first StudyDate, YYYYMMDD or YYYY-MM-DD (sync.since)")
    window.add_argument("--until", metavar="DATE", help="last StudyDate (sync.until; default today)")
    window.add_argument("--window-days", type=int, metavar="DAYS", help="QIDO-RS window (sync.window_days)")
    window.add_argument("--page-size", type=int, metavar="N", help="QIDO-RS limit (sync.page_size)")
    follow = parser.add_argument_group("following changes")
    follow.add_argument("--follow", action="store_true", default=None, help="keep running after the backfill")
    follow.add_argument("--orthanc-url", metavar="URL", help="Orthanc's REST root: follow its /changes feed")
    follow.add_argument("--poll-interval", type=float, metavar="SECONDS", help="sync.poll_interval")
    follow.add_argument("--recent-days", type=int, metavar="DAYS", help="sync.recent_days")
    follow.add_argument("--on-delete", choices=("entered-in-error", "delete", "keep"), help="sync.on_delete")
    dest = parser.add_argument_group("destinations (as serve; override [node] / [fhir])")
    dest.add_argument("-od", "--output-dir", metavar="DIR", type=Path, help="write <StudyInstanceUID>.json here")
    dest.add_argument("--spool-dir", metavar="DIR", type=Path, help="the checkpoint goes to SPOOL/sync/")
    dest.add_argument("--dead-letter-dir", metavar="DIR", type=Path, help="studies that could not be delivered")
    dest.add_argument("--fhir-url", metavar="URL", help="also deliver to this FHIR R4 server")


def _secret(variable: str | None, flag: str) -> str | None:
    from mapping.errors import ConfigurationError

    if variable is None:
        return None
    if variable not in os.environ:
        raise ConfigurationError(f"sync: {flag} names {variable!r}, which is not set in the environment")
    return os.environ[variable]


def load(args: argparse.Namespace):
    from scp.config import load_config, override

    config = load_config(args.config)
    config = override(config, "node", output_dir=args.output_dir, spool_dir=args.spool_dir,
                      dead_letter_dir=args.dead_letter_dir)
    config = override(config, "fhir", url=args.fhir_url)
    return override(
        config, "sync", dicomweb_url=args.dicomweb_url, auth=args.auth,
        token=args.token or _secret(args.token_env, "--token-env"), username=args.username,
        password=_secret(args.password_env, "--password-env"), token_url=args.token_url, client_id=args.client_id,
        client_secret=_secret(args.client_secret_env, "--client-secret-env"), scope=args.scope,
        timeout=args.timeout, max_response_bytes=args.max_response_bytes, rate_limit=args.rate_limit,
        parallel=args.parallel, retries=args.retries, since=args.since, until=args.until,
        window_days=args.window_days, page_size=args.page_size, follow=args.follow, orthanc_url=args.orthanc_url,
        poll_interval=args.poll_interval, recent_days=args.recent_days, on_delete=args.on_delete)


def run(args: argparse.Namespace) -> int:
    import datetime as dt
    import time

    from mapping.errors import ConfigurationError
    from scp.commands.serve import check_folders
    from scp.errors import DeliveryError
    from scp.node import default_sinks
    from scp.sources.dicomweb.backfill import Syncer
    from scp.sources.dicomweb.checkpoint import Checkpoint
    from scp.sources.dicomweb.client import DicomWebClient
    from scp.store.dead_letter import DeadLetterBox

    config = load(args)
    sync = config.sync
    if not sync.dicomweb_url:
        raise ConfigurationError("sync: --dicomweb-url (sync.dicomweb_url) is required")
    check_folders(config.node)
    sinks = default_sinks(config)
    if not sinks:
        raise ConfigurationError("sync: no destination (set -od or --fhir-url)")
    try:
        checkpoint = Checkpoint.load(config.node.spool_dir, sync.dicomweb_url)
    except ValueError as exc:
        raise ConfigurationError(f"sync: {exc}; move it away to start over") from None
    stop = threading.Event()

    def request_stop(signum, _frame) -> None:
        log.info("%s received: stopping after the studies in flight", signal.Signals(signum).name)
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    client = DicomWebClient(sync.dicomweb_url, sync)
    with _progress() as progress:
        syncer = Syncer(client, sinks, checkpoint, DeadLetterBox(config.node.dead_letter_dir), config.mapping, sync,
                        progress=progress)
        log.info("sync from %s to %s ready on checkpoint %s", client.shown_base,
                 ", ".join(getattr(s, "name", "sink") for s in sinks), checkpoint.path)
        try:
            from scp.sources.dicomweb.follow import follow, start_position
            if sync.follow:
                start_position(syncer)
            report = syncer.backfill(dt.date.today())
            if sync.follow:
                follow(syncer, stop, today=dt.date.today)
        except DeliveryError as exc:
            log.error("sync: %s (the checkpoint keeps what was done; run again to resume)", exc)
            checkpoint.save(time.time())
            for line in syncer.report.summary(client.stats.requests):
                log.info("%s", line)
            return 1
        except KeyboardInterrupt:
            checkpoint.save(time.time())
            for line in syncer.report.summary(client.stats.requests):
                log.info("%s", line)
            return 130
    for line in report.summary(client.stats.requests):
        log.info("%s", line)
    return 1 if report.failed else 0


@contextlib.contextmanager
def _progress():
    """A tqdm bar on a terminal (windows done; studies found/delivered in its postfix), else nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    counts = {"found": 0, "delivered": 0}
    with tqdm(unit="window", file=sys.stderr, dynamic_ncols=True) as bar, logging_redirect_tqdm():
        def advance(what: str, n: int) -> None:
            if what == "window":
                bar.update(n)
            else:
                counts[what] += n
                bar.set_postfix(counts, refresh=False)
        yield advance
