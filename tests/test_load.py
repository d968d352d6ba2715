"""Load: 16 concurrent associations × 200 instances over 6 studies, some fed by several
associations at once (tests/load_scenario.py). Everything is delivered, with exact counts
and no failure status. The throughput printed here is a figure, not a target; the
benchmark (benchmarks/load.py) runs the same scenario.
"""

from __future__ import annotations

import pytest

from tests.clocks import wait_for
from tests.load_scenario import expected_per_study, make_feeds, send_all
from tests.scp_node import NodeProcess, imaging_study, instance_uids

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]


def test_16_concurrent_associations_over_shared_studies_deliver_every_instance_exactly_once(tmp_path):
    feeds = make_feeds(tmp_path / "in")
    expected = expected_per_study(feeds)
    assert len(feeds) == 16 and sum(map(len, expected.values())) == 3200
    assert max(sum(f.study_uid == uid for f in feeds) for uid in expected) > 1
    # All 16 come from one address, as from one busy PACS: above node.max_associations_per_peer's
    # default of 8, so the limit is raised as such a site would raise it.
    node = NodeProcess(tmp_path / "node", idle_timeout=1.0, config="[node]\nmax_associations_per_peer = 16\n").start()
    try:
        result = send_all(node.port, feeds)
        assert result.failures() == []
        assert result.instances == 3200

        def delivered() -> bool:
            return all((doc := node.output_of(uid)) and instance_uids(doc) == sops for uid, sops in expected.items())

        wait_for(delivered, 60, f"every study complete in the output; log:\n{node.log()[-2000:]}")
        for uid, sops in expected.items():
            study = imaging_study(node.output_of(uid))
            assert study["numberOfInstances"] == len(sops)
            assert study["numberOfSeries"] == sum(f.study_uid == uid for f in feeds)
        wait_for(lambda: not [p for p in node.spool.iterdir() if p.is_dir()], 30, "the spool to empty")
        # The journal line follows the spool's removal: wait for it.
        wait_for(lambda: {line["study"] for line in node.deliveries()} == set(expected), 10, "the journal")
        journal = node.deliveries()
        assert all(line["result"] == "delivered" for line in journal)
        log = node.log()
        assert log.count("200 instance(s) stored, 0 failed") == 16
        assert " refused with " not in log and "ERROR" not in log
    finally:
        node.stop()
    print(f"\nload: 16 associations x 200 instances in {result.seconds:.1f} s = {result.throughput:.0f} inst/s "
          f"received (spool fsync'ed per instance)")
