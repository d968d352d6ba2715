"""Load benchmark: 16 concurrent associations x 200 instances into the node, against a
discarding pynetdicom receiver fed the same way in the same run.

    .venv/bin/python benchmarks/load.py [--per-association 200] [--idle-timeout 1] [--repeat 1]

The scenario is tests/load_scenario.py's, the one tests/test_load.py checks: 6 studies,
one fed by 6 associations at once, one by 4, two by 2, two by 1; pydicom's real
CT_small.dcm header (about 39 KB per instance); the senders are pynetdicom threads in
this process, files sent as they are on disk, without TCP_NODELAY (pynetdicom never sets
it); receivers run with the variable unset.

Printed: for the node, inst/s received (first association open to last C-STORE answered)
and inst/s delivered (to the last study's output file); for the discarding receiver,
inst/s received; the ratio node/discard. Exits 1 when an instance was not acknowledged
with success or a study's output misses an instance.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.load_scenario import (ASSOCIATIONS_PER_STUDY, expected_per_study, make_feeds,  # noqa: E402
                                 send_all)
from tests.clocks import wait_for  # noqa: E402
from tests.scp_node import NodeProcess, instance_uids  # noqa: E402

DISCARD = textwrap.dedent("""
    import sys
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts
    ae = AE(ae_title="FHIRSCP")
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 64
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    print("ready", flush=True)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                    evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
""")


def run_node(feeds, work: Path, idle_timeout: float) -> tuple[float, float, list[str]]:
    expected = expected_per_study(feeds)
    # every association comes from 127.0.0.1: above node.max_associations_per_peer's default of 8
    node = NodeProcess(work, idle_timeout=idle_timeout, config="[node]\nmax_associations_per_peer = 16\n").start()
    try:
        started = time.monotonic()
        result = send_all(node.port, feeds)
        problems = result.failures()

        def missing() -> list[str]:
            out = []
            for uid, sops in expected.items():
                try:
                    document = json.loads((node.output / f"{uid}.json").read_text())
                except (FileNotFoundError, ValueError):
                    out.append(uid)
                    continue
                if instance_uids(document) != sops:
                    out.append(uid)
            return out

        try:
            wait_for(lambda: not missing(), 300, "every study in the output")
        except AssertionError:
            problems.append(f"studies incomplete in the output: {missing()}")
        delivered = time.monotonic() - started
    finally:
        node.stop()
    return result.throughput, result.instances / delivered, problems


def free_port() -> int:
    """A port for the discard receiver (a script that takes its port on the command line)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_discard(feeds) -> tuple[float, list[str]]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", DISCARD, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        process.stdout.readline()
        time.sleep(0.3)  # start_server binds right after the ready line
        result = send_all(port, feeds)
        return result.throughput, result.failures()
    finally:
        process.terminate()
        process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-association", type=int, default=200)
    parser.add_argument("--idle-timeout", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each receiver, best kept")
    args = parser.parse_args()
    total = sum(ASSOCIATIONS_PER_STUDY) * args.per_association
    print(f"load: {sum(ASSOCIATIONS_PER_STUDY)} concurrent associations x {args.per_association} instances "
          f"= {total} over {len(ASSOCIATIONS_PER_STUDY)} studies (associations per study: "
          f"{', '.join(map(str, ASSOCIATIONS_PER_STUDY))}); senders: pynetdicom threads, no TCP_NODELAY")
    problems: list[str] = []
    node_in = node_out = discard = 0.0
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        feeds = make_feeds(Path(tmp) / "in", args.per_association)
        for attempt in range(args.repeat):
            received, delivered, issues = run_node(feeds, Path(tmp) / f"node{attempt}", args.idle_timeout)
            problems += issues
            node_in, node_out = max(node_in, received), max(node_out, delivered)
            baseline, issues = run_discard(feeds)
            problems += issues
            discard = max(discard, baseline)
    print(f"  node     received  {node_in:7.0f} inst/s  (header spooled + fsync'ed before each success)")
    print(f"  node     delivered {node_out:7.0f} inst/s  (until the last study's output file, "
          f"idle timeout {args.idle_timeout:g} s included)")
    print(f"  discard  received  {discard:7.0f} inst/s  (pynetdicom receiver answering success, storing nothing)")
    print(f"  ratio node/discard received: {node_in / discard:.2f}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
