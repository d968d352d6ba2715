"""Delivering studies to a real, validating FHIR engine (tests/fhir_server via tests/fhir_engine.py).

scp.sinks.fhir.sink.FhirSink is driven directly with StudyResources from the mapping;
every request goes over HTTP to Medplum's engine, which validates each create and
update. The engine's request counter is the proof of how many requests a delivery costs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from mapping import MappingError, MappingOptions, StudyResources, convert_study, render
from scp.sinks.fhir.auth import ClientCredentials
from scp.config import FhirConfig
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.sinks.fhir.client import FhirClient
from scp.sinks.fhir.sink import FhirSink
from tests.conftest import require_tool
from tests.dicomgen import template_dataset
from tests.fhir_engine import FhirEngine, make_tls_files, start_or_skip
from tests.fhir_engine import fhir_engine, fhir_engine_process  # noqa: F401 (fixtures)
from tests.mapping_cases import reread

pytestmark = pytest.mark.interop

MRN = "http://hospital.example/mrn"
OPTIONS = MappingOptions(patient_identifier_system=MRN)
DICOMWEB = "https://pacs.example/dicomweb"


# --- building studies -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def template() -> pydicom.Dataset:
    ds = template_dataset()
    del ds.PixelData  # the mapping reads headers only
    return ds


@dataclasses.dataclass
class Study:
    """A study's UIDs; ``part()`` makes StudyResources for some of its instances."""

    template: pydicom.Dataset
    uid: str = dataclasses.field(default_factory=generate_uid)
    series: tuple[str, ...] = dataclasses.field(default_factory=lambda: (generate_uid(), generate_uid()))
    patient_id: str = "PAT-0001"

    def datasets(self, n: int, series: int = 0, first: int = 1) -> list[pydicom.Dataset]:
        out = []
        for i in range(n):
            ds = copy.deepcopy(self.template)
            ds.StudyInstanceUID = self.uid
            ds.SeriesInstanceUID = self.series[series]
            ds.SeriesNumber = series + 1
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = first + i
            ds.PatientID = self.patient_id
            out.append(ds)
        return out

    def part(self, n: int, series: int = 0, first: int = 1, options: MappingOptions = OPTIONS) -> StudyResources:
        return convert_study(self.datasets(n, series, first), options)


@pytest.fixture
def study(template) -> Study:
    return Study(template)


def sink_for(engine: FhirEngine, options: MappingOptions = OPTIONS, **fhir: object) -> FhirSink:
    return FhirSink(FhirConfig(url=engine.base_url, **fhir), options)


def only(resources: list[dict]) -> dict:
    assert len(resources) == 1, f"expected one resource, the server holds {len(resources)}"
    return resources[0]


def instance_uids(imaging_study: dict) -> set[str]:
    return {i["uid"] for s in imaging_study.get("series", []) for i in s.get("instance", [])}


def part_uids(resources: StudyResources) -> set[str]:
    return {i["uid"] for s in resources.imaging_study.get("series") or [] for i in s.get("instance") or []}


# --- first delivery, resend, merge ------------------------------------------------------------

def test_first_delivery_creates_patient_imaging_study_and_endpoint_with_resolved_references(fhir_engine, study):
    options = dataclasses.replace(OPTIONS, dicomweb_url=DICOMWEB)
    resources = study.part(3, options=options)

    sink_for(fhir_engine, options).deliver(resources)

    patient = only(fhir_engine.resources("Patient"))
    endpoint = only(fhir_engine.resources("Endpoint"))
    imaging = only(fhir_engine.resources("ImagingStudy"))
    assert patient["identifier"][0]["system"] == MRN and patient["identifier"][0]["value"] == "PAT-0001"
    assert endpoint["address"] == DICOMWEB and endpoint["status"] == "active"
    assert imaging["subject"]["reference"] == f"Patient/{patient['id']}"
    assert [e["reference"] for e in imaging["endpoint"]] == [f"Endpoint/{endpoint['id']}"]
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{study.uid}"} in imaging["identifier"]
    assert imaging["numberOfInstances"] == 3 and instance_uids(imaging) == part_uids(resources)


def test_first_delivery_takes_at_most_three_requests(fhir_engine, study, template):
    big = convert_study(Study(template, uid=study.uid).datasets(200), OPTIONS)

    sink_for(fhir_engine).deliver(big)

    sent = fhir_engine.request_log()
    assert len(sent) <= 3, sent
    assert [(method, status) for method, _, status in sent] == [("GET", 200), ("POST", 200)]


def test_without_a_dicomweb_url_no_endpoint_is_created(fhir_engine, study):
    sink_for(fhir_engine).deliver(study.part(2))

    assert fhir_engine.resources("Endpoint") == []
    assert "endpoint" not in only(fhir_engine.resources("ImagingStudy"))


def test_a_resend_creates_no_duplicates_and_sends_only_the_search(fhir_engine, study):
    resources = study.part(3)
    sink = sink_for(fhir_engine)
    sink.deliver(resources)
    version = only(fhir_engine.resources("ImagingStudy"))["meta"]["versionId"]
    fhir_engine.reset_stats()

    result = sink.deliver(resources)

    assert "unchanged" in result
    assert [method for method, _, _ in fhir_engine.request_log()] == ["GET"]
    assert only(fhir_engine.resources("ImagingStudy"))["meta"]["versionId"] == version
    assert len(fhir_engine.resources("Patient")) == 1


def test_a_second_part_merges_into_the_study(fhir_engine, study):
    first, second = study.part(3, series=0), study.part(2, series=1, first=4)
    sink = sink_for(fhir_engine)
    sink.deliver(first)
    fhir_engine.reset_stats()

    sink.deliver(second)

    imaging = only(fhir_engine.resources("ImagingStudy"))
    assert instance_uids(imaging) == part_uids(first) | part_uids(second)
    assert imaging["numberOfSeries"] == 2 and imaging["numberOfInstances"] == 5
    assert [method for method, _, _ in fhir_engine.request_log()] == ["GET", "PUT"]
    assert len(fhir_engine.resources("Patient")) == 1


def test_a_dicomweb_endpoint_configured_later_is_created_and_linked_on_the_next_part(fhir_engine, study):
    sink_for(fhir_engine).deliver(study.part(2))
    options = dataclasses.replace(OPTIONS, dicomweb_url=DICOMWEB)

    sink_for(fhir_engine, options).deliver(study.part(1, series=1, options=options))

    endpoint = only(fhir_engine.resources("Endpoint"))
    imaging = only(fhir_engine.resources("ImagingStudy"))
    assert [e["reference"] for e in imaging["endpoint"]] == [f"Endpoint/{endpoint['id']}"]
    assert imaging["numberOfInstances"] == 3


def test_a_part_with_another_dicomweb_url_keeps_the_first_endpoint_and_adds_the_second(fhir_engine, study):
    first = dataclasses.replace(OPTIONS, dicomweb_url=DICOMWEB)
    second = dataclasses.replace(OPTIONS, dicomweb_url="https://archive.example/wado")
    sink_for(fhir_engine, first).deliver(study.part(2, options=first))
    part = study.part(1, series=1, first=3, options=second)
    sink_for(fhir_engine, second).deliver(part)

    endpoints = {e["address"]: e["id"] for e in fhir_engine.resources("Endpoint")}
    imaging = only(fhir_engine.resources("ImagingStudy"))
    assert list(endpoints) == [DICOMWEB, "https://archive.example/wado"]
    assert [e["reference"] for e in imaging["endpoint"]] == [f"Endpoint/{i}" for i in endpoints.values()]
    assert [e["reference"] for e in imaging["series"][1]["endpoint"]] == [f"Endpoint/{endpoints[part.endpoints[0]['address']]}"]
    fhir_engine.reset_stats()
    assert "unchanged" in sink_for(fhir_engine, second).deliver(part)  # resending changes nothing
    assert [method for method, _, _ in fhir_engine.request_log()] == ["GET"]


def test_a_study_whose_server_references_lack_our_identifier_gets_no_second_reference(fhir_engine, study):
    # As a study delivered before endpoint references carried the Endpoint's identifier.
    options = dataclasses.replace(OPTIONS, dicomweb_url=DICOMWEB)
    sink_for(fhir_engine, options).deliver(study.part(2, options=options))
    imaging = only(fhir_engine.resources("ImagingStudy"))
    old = {k: v for k, v in imaging.items() if k != "meta"} | {"endpoint": [
        {"reference": e["reference"]} for e in imaging["endpoint"]]}
    old["series"] = [{k: v for k, v in s.items() if k != "endpoint"} for s in imaging["series"]]
    assert requests.put(f"{fhir_engine.base_url}/ImagingStudy/{imaging['id']}", json=old,
                        headers={"Content-Type": "application/fhir+json"}, timeout=30).status_code == 200

    sink_for(fhir_engine, options).deliver(study.part(1, series=1, first=3, options=options))

    endpoint = only(fhir_engine.resources("Endpoint"))
    imaging = only(fhir_engine.resources("ImagingStudy"))
    assert [e["reference"] for e in imaging["endpoint"]] == [f"Endpoint/{endpoint['id']}"]
    assert [e["reference"] for e in imaging["series"][1]["endpoint"]] == [f"Endpoint/{endpoint['id']}"]


def test_an_existing_patient_record_is_referenced_and_never_overwritten(fhir_engine, study):
    master = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "PAT-0001"}],
              "name": [{"family": "Master", "given": ["Record"]}], "gender": "female"}
    created = requests.post(f"{fhir_engine.base_url}/Patient", json=master, timeout=30,
                            headers={"Content-Type": "application/fhir+json"}).json()

    sink_for(fhir_engine).deliver(study.part(2))  # CT_small's patient: another name, another sex

    patient = only(fhir_engine.resources("Patient"))
    assert patient["meta"]["versionId"] == created["meta"]["versionId"]
    assert patient["name"] == master["name"] and patient["gender"] == "female"
    assert only(fhir_engine.resources("ImagingStudy"))["subject"]["reference"] == f"Patient/{created['id']}"


def test_without_an_identifier_system_another_issuers_patient_with_the_same_id_is_not_matched(fhir_engine, study):
    other = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3.999", "value": "PAT-0001"}],
             "name": [{"family": "Other", "given": ["Hospital"]}]}
    created = requests.post(f"{fhir_engine.base_url}/Patient", json=other, timeout=30,
                            headers={"Content-Type": "application/fhir+json"}).json()

    sink_for(fhir_engine, MappingOptions()).deliver(study.part(2, options=MappingOptions()))

    ours = [p for p in fhir_engine.resources("Patient") if p["id"] != created["id"]]
    assert [p["identifier"] for p in ours] == [[{"type": ours[0]["identifier"][0]["type"], "value": "PAT-0001"}]]
    assert only(fhir_engine.resources("ImagingStudy"))["subject"]["reference"] == f"Patient/{ours[0]['id']}"


def test_a_part_from_another_patient_is_rejected_and_not_merged(fhir_engine, study, template):
    sink_for(fhir_engine).deliver(study.part(2))
    other = Study(template, uid=study.uid, series=study.series, patient_id="PAT-9999")

    with pytest.raises(DeliveryRejected, match="PatientMismatch"):
        sink_for(fhir_engine).deliver(other.part(1, series=1))

    assert only(fhir_engine.resources("ImagingStudy"))["numberOfInstances"] == 2


# --- several senders at once ------------------------------------------------------------------

class PausingClient(FhirClient):
    """A real client that waits at a barrier after its first search, so two deliveries
    are forced into the interleaving under test (both search before either writes)."""

    def __init__(self, fhir: FhirConfig, barrier: threading.Barrier) -> None:
        super().__init__(fhir)
        self._barrier = barrier
        self._paused = False

    def request(self, method, path, **kwargs):
        reply = super().request(method, path, **kwargs)
        if method == "GET" and not self._paused:
            self._paused = True
            self._barrier.wait(timeout=30)
        return reply


def deliver_together(engine: FhirEngine, parts: Iterable[StudyResources], *, pause: bool) -> list[object]:
    parts = list(parts)
    barrier = threading.Barrier(len(parts))
    results: list[object] = [None] * len(parts)
    fhir = FhirConfig(url=engine.base_url)

    def run(i: int, part: StudyResources) -> None:
        client = PausingClient(fhir, barrier) if pause else FhirClient(fhir)
        if not pause:
            barrier.wait(timeout=30)
        try:
            results[i] = FhirSink(fhir, OPTIONS, client=client).deliver(part)
        except Exception as exc:  # reported by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_two_senders_creating_the_same_study_at_once_end_with_one_study_holding_every_instance(fhir_engine, study):
    # Both searches find nothing; the second transaction's ifNoneExist matches the first's study.
    parts = [study.part(3, series=0), study.part(2, series=1, first=10)]

    results = deliver_together(fhir_engine, parts, pause=True)

    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(method for method, _, _ in fhir_engine.request_log()) == ["GET", "GET", "GET", "POST", "POST", "PUT"]
    imaging = only(fhir_engine.resources("ImagingStudy"))
    assert instance_uids(imaging) == part_uids(parts[0]) | part_uids(parts[1])
    assert imaging["numberOfInstances"] == 5
    assert len(fhir_engine.resources("Patient")) == 1


def test_two_senders_updating_the_same_study_at_once_both_land_after_a_412(fhir_engine, study):
    sink_for(fhir_engine).deliver(study.part(1, series=0))
    parts = [study.part(2, series=0, first=2), study.part(2, series=1, first=10)]
    fhir_engine.reset_stats()

    results = deliver_together(fhir_engine, parts, pause=True)

    assert not [r for r in results if isinstance(r, Exception)], results
    assert 412 in [status for _, _, status in fhir_engine.request_log()]
    imaging = only(fhir_engine.resources("ImagingStudy"))
    assert imaging["numberOfInstances"] == 5 and instance_uids(imaging) >= part_uids(parts[0]) | part_uids(parts[1])


def test_four_senders_racing_on_one_study_lose_nothing(fhir_engine, study, template):
    study.series = tuple(generate_uid() for _ in range(4))
    parts = [study.part(3, series=i, first=10 * i) for i in range(4)]

    results = deliver_together(fhir_engine, parts, pause=False)

    assert not [r for r in results if isinstance(r, Exception)], results
    imaging = only(fhir_engine.resources("ImagingStudy"))
    assert instance_uids(imaging) == set().union(*map(part_uids, parts))
    assert imaging["numberOfSeries"] == 4 and imaging["numberOfInstances"] == 12
    assert len(fhir_engine.resources("Patient")) == 1


# --- failures ---------------------------------------------------------------------------------

def test_a_server_answering_503_is_retried_later(fhir_engine, study):
    resources = study.part(2)
    fhir_engine.fault(count=1, status=503)

    with pytest.raises(DeliveryRetryable, match="503"):
        sink_for(fhir_engine).deliver(resources)
    sink_for(fhir_engine).deliver(resources)

    assert only(fhir_engine.resources("ImagingStudy"))["numberOfInstances"] == 2


def test_throttling_is_retried_after_the_time_the_server_asks_for(fhir_engine, study):
    fhir_engine.fault(count=1, status=429, retry_after=7)

    with pytest.raises(DeliveryRetryable) as caught:
        sink_for(fhir_engine).deliver(study.part(1))

    assert caught.value.retry_after == 7.0


def test_a_transaction_failing_with_503_is_delivered_once_when_retried(fhir_engine, study):
    resources = study.part(2)
    sink = sink_for(fhir_engine)
    fhir_engine.fault(count=1, status=503, method="POST")

    with pytest.raises(DeliveryRetryable):
        sink.deliver(resources)
    sink.deliver(resources)
    assert "unchanged" in sink.deliver(resources)

    assert only(fhir_engine.resources("ImagingStudy"))["numberOfInstances"] == 2


def test_a_reply_lost_after_the_server_stored_the_study_creates_no_duplicate_on_retry(fhir_engine, study):
    resources = study.part(2)
    sink = sink_for(fhir_engine)
    fhir_engine.fault(count=1, mode="lose-reply", method="POST")

    with pytest.raises(DeliveryRetryable):
        sink.deliver(resources)
    assert "unchanged" in sink.deliver(resources)

    assert only(fhir_engine.resources("ImagingStudy"))["numberOfInstances"] == 2
    assert len(fhir_engine.resources("Patient")) == 1


def test_a_server_that_is_down_means_retry_later(study, refusing_port):
    sink = FhirSink(FhirConfig(url=f"http://127.0.0.1:{refusing_port.port}", timeout=5), OPTIONS)

    with pytest.raises(DeliveryRetryable, match="unreachable"):
        sink.deliver(study.part(1))


def test_a_server_that_never_answers_means_retry_later(fhir_engine, study):
    fhir_engine.fault(count=1, mode="hang")

    with pytest.raises(DeliveryRetryable, match="did not answer"):
        sink_for(fhir_engine, timeout=0.5).deliver(study.part(1))


def test_a_dropped_connection_means_retry_later(fhir_engine, study):
    fhir_engine.fault(count=1, mode="close")

    with pytest.raises(DeliveryRetryable):
        sink_for(fhir_engine).deliver(study.part(1))


def test_a_resource_the_server_rejects_is_set_aside_with_the_bundle_and_the_outcome(fhir_engine, study):
    resources = study.part(2)
    broken = dataclasses.replace(resources, patient={**resources.patient, "gender": "M"})

    with pytest.raises(DeliveryRejected) as caught:
        sink_for(fhir_engine).deliver(broken)

    # The reason names the status and what the answer is; the server's diagnostics are in the details.
    assert "HTTP 400" in str(caught.value) and "OperationOutcome: " in str(caught.value)
    assert "gender" in caught.value.details
    documents = caught.value.documents
    outcome = json.loads(documents["outcome.json"])
    sent = json.loads(documents["bundle.json"])
    assert outcome["resourceType"] == "OperationOutcome" and "gender" in json.dumps(outcome)
    assert sent["resourceType"] == "Bundle" and sent["type"] == "transaction"
    assert fhir_engine.resources("ImagingStudy") == [] and fhir_engine.resources("Patient") == []


# --- authentication ---------------------------------------------------------------------------

def test_a_bearer_token_is_sent(fhir_engine, study):
    fhir_engine.set_auth("bearer", token="tok-123")

    sink_for(fhir_engine, auth="bearer", token="tok-123").deliver(study.part(1))

    assert len(fhir_engine.resources("ImagingStudy")) == 1


def test_a_wrong_bearer_token_is_rejected(fhir_engine, study):
    fhir_engine.set_auth("bearer", token="tok-123")

    with pytest.raises(DeliveryRejected, match="401"):
        sink_for(fhir_engine, auth="bearer", token="tok-456").deliver(study.part(1))
    assert fhir_engine.stats()["requests"] == 1  # a static token is not tried twice


def test_basic_credentials_are_sent(fhir_engine, study):
    fhir_engine.set_auth("basic", username="node", password="pä:ss")

    sink_for(fhir_engine, auth="basic", username="node", password="pä:ss").deliver(study.part(1))

    assert len(fhir_engine.resources("ImagingStudy")) == 1


def test_wrong_basic_credentials_are_rejected(fhir_engine, study):
    fhir_engine.set_auth("basic", username="node", password="right")

    with pytest.raises(DeliveryRejected, match="401"):
        sink_for(fhir_engine, auth="basic", username="node", password="wrong").deliver(study.part(1))


def oauth2(engine: FhirEngine, secret: str = "s3cret/+&=", **extra: object) -> dict:
    return dict(auth="oauth2", token_url=engine.token_url, client_id="dicom node", client_secret=secret, **extra)


def test_oauth2_client_credentials_token_is_fetched_once_and_reused(fhir_engine, study, template):
    fhir_engine.set_auth("oauth2", clientId="dicom node", clientSecret="s3cret/+&=")
    sink = sink_for(fhir_engine, **oauth2(fhir_engine, scope="system/*.write"))

    sink.deliver(study.part(1))
    sink.deliver(Study(template).part(1))

    stats = fhir_engine.stats()
    assert stats["tokenRequests"] == 1
    assert stats["requests"] == 4  # two deliveries of two requests: token requests are not FHIR requests
    assert len(fhir_engine.resources("ImagingStudy")) == 2


def test_oauth2_a_401_fetches_a_new_token_once(fhir_engine, study, template):
    fhir_engine.set_auth("oauth2", clientId="dicom node", clientSecret="s3cret/+&=")
    sink = sink_for(fhir_engine, **oauth2(fhir_engine))
    sink.deliver(study.part(1))
    fhir_engine.revoke_tokens()  # the server forgets the token before it expires

    sink.deliver(Study(template).part(1))

    assert fhir_engine.stats()["tokenRequests"] == 2
    assert len(fhir_engine.resources("ImagingStudy")) == 2


def test_oauth2_token_is_renewed_before_it_expires(fhir_engine, study, template):
    fhir_engine.set_auth("oauth2", clientId="dicom node", clientSecret="s3cret/+&=", tokenLifetime=300)
    now = [1000.0]
    fhir = FhirConfig(url=fhir_engine.base_url, **oauth2(fhir_engine))
    auth = ClientCredentials(fhir.token_url, fhir.client_id, fhir.client_secret, clock=lambda: now[0])
    sink = FhirSink(fhir, OPTIONS, client=FhirClient(fhir, auth=auth))
    sink.deliver(study.part(1))
    now[0] += 300 - 29  # inside the 30 s safety margin

    sink.deliver(Study(template).part(1))

    assert fhir_engine.stats()["tokenRequests"] == 2
    assert not [r for r in fhir_engine.request_log() if r[2] == 401]


def test_oauth2_wrong_client_secret_is_rejected(fhir_engine, study):
    fhir_engine.set_auth("oauth2", clientId="dicom node", clientSecret="s3cret/+&=")

    with pytest.raises(DeliveryRejected, match="refused client"):
        sink_for(fhir_engine, **oauth2(fhir_engine, secret="nope")).deliver(study.part(1))
    assert fhir_engine.stats()["requests"] == 0


# --- what the mapping emits is valid FHIR -------------------------------------------------------

@pytest.fixture(scope="module")
def pydicom_test_studies() -> dict[str, list[pydicom.Dataset]]:
    """Every readable file in pydicom's test data (and pydicom-data's when installed), by study."""
    from pydicom.data import get_testdata_files

    studies: dict[str, list[pydicom.Dataset]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # "**/*" lists the local files only; "*" would also try to download, slowly, offline.
        for path in sorted(get_testdata_files("**/*")):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                uid = str(ds.StudyInstanceUID)
                str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID)
            except Exception:  # broken on purpose, or not an instance: not this test's subject
                continue
            if uid:
                studies.setdefault(uid, []).append(ds)
    return studies


@pytest.mark.parametrize("options", [
    MappingOptions(),
    MappingOptions(patient_identifier_system="urn:oid:1.2.840.99999.1", use_issuer_of_patient_id=True,
                   accession_system="http://hospital.example/accession", timezone="Europe/Paris",
                   dicomweb_url=DICOMWEB),
], ids=["defaults", "every-option"])
def test_every_study_in_the_real_test_files_is_accepted_by_the_validating_engine(fhir_engine, options,
                                                                                  pydicom_test_studies):
    studies = pydicom_test_studies
    assert len(studies) >= 20
    refused = []
    for uid, datasets in studies.items():
        try:
            resources = convert_study(datasets, options)
        except MappingError:
            continue  # e.g. instances disagreeing on PatientID: held back by design, not sent
        try:
            FhirSink(FhirConfig(url=fhir_engine.base_url), options).deliver(resources)
        except DeliveryRejected as exc:
            refused.append(f"{uid}: {exc}")
    assert not refused, "\n".join(refused)
    assert len(fhir_engine.resources("ImagingStudy")) >= 20


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom's, about the values set on purpose
@pytest.mark.parametrize("keyword, value", [
    ("StudyDescription", "Head\x01CT"),  # -> ImagingStudy.description
    ("PatientID", "12\x0734"),  # -> Patient.identifier.value
    ("AccessionNumber", "A\x1f1"),  # -> ImagingStudy.identifier.value
    ("PatientName", "Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"),  # ISO 2022 escapes, no SpecificCharacterSet
    ("ImageType", ["ORIGINAL\x00X", "PRIMARY"]),  # -> instance.title
    ("Modality", "C\x0bT"),  # -> a code: "Invalid code format"
])
def test_text_with_control_characters_is_still_accepted(fhir_engine, template, keyword, value):
    ds = Study(template).datasets(1)[0]
    setattr(ds, keyword, value)

    sink_for(fhir_engine).deliver(convert_study([ds], OPTIONS))

    assert len(fhir_engine.resources("ImagingStudy")) == 1


def test_a_merged_study_the_server_refuses_is_set_aside_with_what_was_sent(fhir_engine, study):
    sink = sink_for(fhir_engine)
    sink.deliver(study.part(2))
    second = study.part(1, series=1, first=3)
    invalid = {**second.imaging_study, "description": "Head\x01CT"}  # no control characters in FHIR

    with pytest.raises(DeliveryRejected) as caught:
        sink.deliver(dataclasses.replace(second, imaging_study=invalid))

    documents = caught.value.documents
    assert json.loads(documents["imagingstudy.json"])["resourceType"] == "ImagingStudy"  # the PUT's body
    assert json.loads(documents["bundle.json"])["type"] == "transaction"  # the study, as a retry sends it
    assert "description" in json.loads(documents["outcome.json"])["issue"][0]["expression"][0]
    assert only(fhir_engine.resources("ImagingStudy"))["numberOfInstances"] == 2


# --- TLS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def https_engine(tmp_path_factory) -> Iterator[FhirEngine]:
    tls = make_tls_files(tmp_path_factory.mktemp("tls"), require_tool("openssl"))
    engine = start_or_skip(tls=tls)
    yield engine
    engine.stop()


def test_a_server_certificate_from_an_unknown_ca_is_refused_and_the_study_kept(https_engine, study):
    assert https_engine.base_url.startswith("https://")

    with pytest.raises(DeliveryRetryable, match="SSLError"):
        sink_for(https_engine).deliver(study.part(1))  # verified against the system's CAs by default
    assert https_engine.resources("ImagingStudy") == []


def test_a_configured_ca_bundle_lets_the_node_trust_a_private_ca(https_engine, study):
    https_engine.reset()

    sink_for(https_engine, ca_bundle=Path(https_engine.verify)).deliver(study.part(1))

    assert len(https_engine.resources("ImagingStudy")) == 1


def test_credentials_never_appear_in_logs_or_reasons(fhir_engine, study, caplog):
    caplog.set_level(logging.DEBUG)
    reasons = []
    attempts = [
        ("bearer", dict(token="right-TOKEN-1"), dict(auth="bearer", token="wrong-TOKEN-2")),
        ("basic", dict(username="node", password="right-PASS-1"),
         dict(auth="basic", username="node", password="wrong-PASS-2")),
        ("oauth2", dict(clientId="dicom node", clientSecret="right-SECRET-1"), oauth2(fhir_engine, "wrong-SECRET-2")),
        ("oauth2", dict(clientId="dicom node", clientSecret="right-SECRET-1"), oauth2(fhir_engine, "right-SECRET-1")),
    ]
    for mode, server, client in attempts:
        fhir_engine.set_auth(mode, **server)
        try:
            reasons.append(sink_for(fhir_engine, **client).deliver(study.part(1)))
        except DeliveryRejected as exc:
            reasons.append(f"{exc} {exc.documents.get('outcome.json', b'')!r}")

    shown = caplog.text + "\n".join(reasons)
    assert "ImagingStudy/" in shown  # the last one was delivered and logged
    for secret in ("TOKEN", "PASS", "SECRET"):
        assert secret not in shown


# Text as senders really send it: any characters, odd spacing, any length, in every element the
# mapping copies into FHIR (written to bytes and read back, as from the network).
# Text VRs carry any character (UTF-8 declared); CS, DA, TM and the like only the default repertoire,
# but senders put anything of it there, control characters and odd spacing included.
odd_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24)
odd_ascii = st.text(st.characters(max_codepoint=127), max_size=16)
HEADER_TEXT = {**dict.fromkeys(("StudyDescription", "SeriesDescription", "PatientName", "PatientID", "InstitutionName",
                                "InstitutionalDepartmentName", "ReferringPhysicianName", "AccessionNumber",
                                "ReasonForRequestedProcedure"), odd_text),
               **dict.fromkeys(("BodyPartExamined", "Modality", "PatientSex", "PatientBirthDate", "StudyDate",
                                "StudyTime", "SeriesDate", "SeriesTime", "TimezoneOffsetFromUTC", "Laterality"),
                               odd_ascii)}
header_values = st.lists(st.sampled_from(sorted(HEADER_TEXT)), max_size=6, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: HEADER_TEXT[k] for k in keys}))


@pytest.mark.filterwarnings("ignore")  # pydicom warns about every odd value, on purpose here
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(values=header_values,
       procedure=st.none() | st.tuples(odd_ascii, st.sampled_from(["DCM", "SCT", "LN", "99LOCAL", ""]), odd_text))
def test_whatever_text_a_sender_puts_in_the_header_the_engine_accepts_the_study(fhir_engine_process, template,
                                                                                values, procedure):
    fhir_engine_process.set_auth("none")  # a session fixture (hypothesis runs many examples per test)
    ds = Study(template).datasets(1)[0]
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    if procedure is not None:
        item = pydicom.Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = procedure
        ds.ProcedureCodeSequence = [item]
    try:
        resources = convert_study([reread(ds)], OPTIONS)
    except MappingError:
        return  # refused with the project's error (e.g. a UID that is no FHIR id): not sent
    document = render(resources, "bundle")

    response = requests.post(fhir_engine_process.base_url, json=document, timeout=30,
                             headers={"Content-Type": "application/fhir+json"})

    assert response.status_code == 200, (response.text[:1000], values, procedure)
