"""scp.ops.metrics: the node's metrics (fixed names, thread-safe, one registry per node)."""

from __future__ import annotations

import os
import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scp.ops.metrics import COUNTERS, Metrics

NAMES = ("instances_received", "instances_failed", "associations", "studies_completed",
         "deliveries_ok", "deliveries_failed")


def test_every_counter_the_node_uses_exists_and_starts_at_zero():
    assert set(NAMES) == set(COUNTERS)
    assert Metrics().snapshot() == dict.fromkeys(NAMES, 0)


def test_inc_adds_one_by_default_and_n_when_given():
    m = Metrics()
    m.inc("instances_received")
    m.inc("instances_received", 4)
    m.inc("deliveries_ok", 0)
    assert m.snapshot()["instances_received"] == 5
    assert m.snapshot()["deliveries_ok"] == 0


def test_an_unknown_counter_name_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="instances_recieved"):
        Metrics().inc("instances_recieved")


def test_counters_never_go_down():
    with pytest.raises(ValueError, match="n:"):
        Metrics().inc("associations", -1)


def test_a_snapshot_is_a_copy_not_a_live_view():
    m = Metrics()
    snap = m.snapshot()
    snap["associations"] = 99
    m.inc("associations")
    assert m.snapshot()["associations"] == 1
    assert snap["associations"] == 99


def test_concurrent_increments_are_all_counted():
    m = Metrics()
    threads = [threading.Thread(target=lambda: [m.inc("instances_received") for _ in range(5000)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.snapshot()["instances_received"] == 40000


def samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) → value, from the exposition text through prometheus_client's parser."""
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_instance_and_association_counters_carry_the_calling_aet():
    m = Metrics()
    modality = m.for_sender("MODALITY")
    modality.associations.inc()
    modality.stored(True, 0.002)
    modality.stored(False, 0.001)
    m.for_sender("OTHER").stored(True, 0.003)
    got = samples(m)
    assert got[("dicom_fhir_scp_instances_received_total", (("calling_aet", "MODALITY"),))] == 1
    assert got[("dicom_fhir_scp_instances_failed_total", (("calling_aet", "MODALITY"),))] == 1
    assert got[("dicom_fhir_scp_associations_total", (("calling_aet", "MODALITY"),))] == 1
    assert got[("dicom_fhir_scp_instances_received_total", (("calling_aet", "OTHER"),))] == 1
    assert got[("dicom_fhir_scp_instance_store_seconds_count", (("calling_aet", "MODALITY"),))] == 2
    assert m.snapshot()["instances_received"] == 2


def test_a_counter_without_a_sender_label_refuses_one():
    with pytest.raises(ValueError, match="calling_aet"):
        Metrics().inc("studies_completed", calling_aet="MODALITY")


def test_a_delivery_is_counted_under_its_studys_sender_and_timed():
    m = Metrics()
    m.delivered(1.5, "CT_A")
    got = samples(m)
    assert got[("dicom_fhir_scp_deliveries_ok_total", (("calling_aet", "CT_A"),))] == 1
    assert got[("dicom_fhir_scp_study_delivery_seconds_count", ())] == 1
    assert got[("dicom_fhir_scp_study_delivery_seconds_sum", ())] == 1.5
    assert got[("dicom_fhir_scp_study_delivery_seconds_bucket", (("le", "2.5"),))] == 1
    assert got[("dicom_fhir_scp_study_delivery_seconds_bucket", (("le", "1.0"),))] == 0


def test_disk_gauges_are_read_at_scrape_time_only():
    m = Metrics()
    reads = []
    m.watch("spool_bytes", lambda: reads.append(1) or 4096)
    m.watch("dead_letter_studies", lambda: 2)
    assert reads == []
    got = samples(m)
    assert reads == [1]
    assert got[("dicom_fhir_scp_spool_bytes", ())] == 4096
    assert got[("dicom_fhir_scp_dead_letter_studies", ())] == 2


def test_an_unknown_gauge_name_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="spool_byte"):
        Metrics().watch("spool_byte", lambda: 0)


def test_process_and_platform_metrics_come_for_free():
    names = {name for name, _ in samples(Metrics())}
    assert "python_info" in names
    if os.path.isdir("/proc/self"):  # prometheus_client's process collector reads /proc
        assert "process_resident_memory_bytes" in names


def test_two_nodes_metrics_do_not_share_counts():
    a, b = Metrics(), Metrics()
    a.inc("studies_completed")
    assert b.snapshot()["studies_completed"] == 0
    assert samples(b)[("dicom_fhir_scp_studies_completed_total", ())] == 0


def test_a_delivery_counts_under_the_calling_ae_its_instances_were_spooled_with(tmp_path):
    from scp.store.spool import MemorySpool
    from tests.clocks import FakeClock
    from tests.spooled import make_worker, spool_instance

    class Sink:
        name = "disk"

        def deliver(self, resources) -> str:
            return "ok"

    m = Metrics()
    spool = MemorySpool()
    sop = spool_instance(spool, "1.2.3")  # spooled as calling AE TEST
    worker = make_worker(tmp_path, spool, [Sink()], FakeClock(), metrics=m)
    worker.submit("1.2.3", {sop})
    assert worker.run_once()
    assert samples(m)[("dicom_fhir_scp_deliveries_ok_total", (("calling_aet", "TEST"),))] == 1
