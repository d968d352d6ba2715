"""Memory benchmark: the node's peak RSS receiving huge instances, against its own baseline.

    .venv/bin/python benchmarks/memory.py [--big-mb 2048] [--parallel 4] [--each-mb 500]

Each run starts a fresh node (`python -m scp serve`, disk sink) and reads its VmHWM from
/proc/PID/status after the instances were delivered:
  baseline   one ordinary 39 KB CT instance
  one big    one generated --big-mb instance (sparse file, tests/bigfiles.py)
  parallel   --parallel instances of --each-mb each, sent at the same time
Sender: dcmtk storescu with TCP_NODELAY=1, one association per file.
Exits 1 when a bound of issue 9 is missed: one 2 GB instance < 300 MB, four 500 MB < 400 MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.bigfiles import large_instance, rss_mb  # noqa: E402
from tests.dicomgen import generate_study  # noqa: E402
from tests.scp_node import NodeProcess  # noqa: E402


def run(root: Path, files: list[Path], studies: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a fresh node receiving files (one storescu each, all at once)."""
    node = NodeProcess(root).start()
    try:
        env = {**os.environ, "TCP_NODELAY": "1"}
        started = time.perf_counter()
        senders = [subprocess.Popen(["storescu", "-aec", "FHIRSCP", "127.0.0.1", str(node.port), str(path)],
                                    env=env, stdout=subprocess.DEVNULL) for path in files]
        for sender in senders:
            if sender.wait(600) != 0:
                raise SystemExit(f"storescu failed; node log:\n{node.log()[-2000:]}")
        elapsed = time.perf_counter() - started
        for study in studies:
            node.wait_for_deliveries(study, timeout=120)
        return rss_mb(node.process.pid), elapsed
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=int, default=2048)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--each-mb", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        root = Path(tmp)
        small = generate_study(root / "small", 1, 1)
        baseline, _ = run(root / "baseline", list(small.files), [small.study_uid])
        big = root / "big.dcm"
        big_study = large_instance(big, args.big_mb << 20).StudyInstanceUID
        one, one_s = run(root / "one", [big], [big_study])
        each = [root / f"each{n}.dcm" for n in range(args.parallel)]
        each_studies = [large_instance(path, args.each_mb << 20).StudyInstanceUID for path in each]
        parallel, parallel_s = run(root / "parallel", each, each_studies)
    print("sender: dcmtk storescu, TCP_NODELAY=1, one association per file; peak RSS = VmHWM of the node")
    print(f"  baseline  1 x 39 KB                  {baseline:7.1f} MB")
    print(f"  one big   1 x {args.big_mb:5d} MB              {one:7.1f} MB  ({one - baseline:+.1f} MB; "
          f"{args.big_mb / one_s:.0f} MB/s)")
    print(f"  parallel  {args.parallel} x {args.each_mb:5d} MB at once      {parallel:7.1f} MB  "
          f"({parallel - baseline:+.1f} MB; {args.parallel * args.each_mb / parallel_s:.0f} MB/s)")
    ok = one < 300 and parallel < 400
    print("targets (2 GB < 300 MB, 4 x 500 MB < 400 MB):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
