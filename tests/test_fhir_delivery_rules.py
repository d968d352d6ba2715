"""Pure rules of FHIR delivery: failure classification, Retry-After, comparison, references.

Everything that talks HTTP is tested against the real engine in test_fhir_delivery.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from scp.sinks.fhir.auth import BasicAuth, BearerAuth, ClientCredentials, renewal_delay, tls_verify
from scp.config import FhirConfig
from scp.sinks.fhir.client import display_url, is_retryable_status, outcome_diagnostics, parse_retry_after
from mapping import StudyResources
from mapping.fhirjson import same_identifier
from scp.errors import DeliveryRejected
from scp.sinks.fhir.sink import ServerStudy, as_compared, check_same_patient, keep_server_references, update_request

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=timezone.utc)


def test_retry_after_in_seconds():
    assert parse_retry_after("120", NOW) == 120.0


def test_retry_after_as_http_date_counts_from_now():
    assert parse_retry_after(format_datetime(NOW + timedelta(seconds=90), usegmt=True), NOW) == 90.0


def test_retry_after_date_in_the_past_means_now():
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5e3"])
def test_unreadable_retry_after_is_ignored(value):
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_timeouts_throttling_and_server_errors_are_retried(status):
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 412, 422])
def test_other_client_errors_are_not_retried(status):
    assert not is_retryable_status(status)


def test_diagnostics_name_each_issue_and_where():
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "Invalid code", "expression": ["ImagingStudy.status"]},
        {"severity": "error", "code": "required", "details": {"text": "Missing subject"}}]}
    assert outcome_diagnostics(outcome) == ("error/invalid: Invalid code at ImagingStudy.status; "
                                            "error/required: Missing subject")


def test_diagnostics_of_a_non_fhir_answer_say_so():
    assert outcome_diagnostics("<html>Bad gateway</html>").startswith("not an OperationOutcome: <html>")


def test_diagnostics_are_kept_short():
    assert len(outcome_diagnostics({"resourceType": "OperationOutcome",
                                    "issue": [{"severity": "error", "code": "x", "diagnostics": "y" * 5000}]})) <= 600


def test_urls_in_messages_never_show_credentials():
    assert display_url("https://user:secret@fhir.example/r4") == "https://fhir.example/r4"


def test_a_token_is_renewed_a_margin_before_it_expires():
    assert renewal_delay(3600, margin=30) == 3570


def test_a_short_lived_token_is_still_used_for_half_its_life():
    assert renewal_delay(40, margin=30) == 20


def test_secrets_never_appear_in_repr():
    shown = " ".join(repr(a) for a in (BearerAuth("tok-SECRET"), BasicAuth("u", "pw-SECRET"),
                                       ClientCredentials("http://t/token", "client", "cs-SECRET")))
    assert "SECRET" not in shown


def test_tls_is_verified_by_default_and_a_ca_bundle_replaces_the_system_store(tmp_path):
    assert tls_verify(FhirConfig(url="https://x")) is True
    assert tls_verify(FhirConfig(url="https://x", ca_bundle=tmp_path / "ca.pem")) == str(tmp_path / "ca.pem")
    assert tls_verify(FhirConfig(url="https://x", verify_tls=False)) is False


def test_unchanged_ignores_meta():
    a = {"resourceType": "ImagingStudy", "id": "1", "meta": {"versionId": "1"}, "status": "available"}
    b = {"resourceType": "ImagingStudy", "id": "1", "meta": {"versionId": "2", "lastUpdated": "x"},
         "status": "available"}
    assert as_compared(a) == as_compared(b)
    assert as_compared(a) != as_compared(b | {"status": "cancelled"})


def test_patient_identifiers_agree_when_system_and_value_match():
    assert same_identifier({("urn:mrn", "123")}, {("urn:mrn", "123"), ("urn:other", "9")})
    assert same_identifier({(None, "123")}, {(None, "123")})
    assert not same_identifier({("urn:mrn", "123")}, {("urn:mrn", "124")})
    assert not same_identifier({("urn:a", "123")}, {("urn:b", "123")})


def test_a_bare_patient_identifier_never_matches_one_with_a_system_either_way():
    # issue #11: a bare value cannot prove identity once a system is known
    assert not same_identifier({(None, "123")}, {("urn:mrn", "123")})
    assert not same_identifier({("urn:mrn", "123")}, {(None, "123")})


def _server_study(*identifiers: dict) -> ServerStudy:
    patient = {"resourceType": "Patient", "id": "7", "identifier": list(identifiers)}
    return ServerStudy("s1", "1", {"resourceType": "ImagingStudy", "subject": {"reference": "Patient/7"}}, (patient,))


def _ours(*identifiers: dict) -> StudyResources:
    return StudyResources("1.2.3", {"resourceType": "Patient", "identifier": list(identifiers)}, {})


@pytest.mark.parametrize("theirs", [{"system": "urn:b", "value": "P1"}, {"value": "P1"}])
def test_the_sink_rejects_a_server_patient_with_our_value_under_another_or_no_system(theirs):
    with pytest.raises(DeliveryRejected, match="PatientMismatchError"):
        check_same_patient(_server_study(theirs), _ours({"system": "urn:a", "value": "P1"}), "study 1.2.3")


def test_the_sink_matches_our_primary_identifier_only_against_any_of_the_servers():
    server = _server_study({"system": "urn:x", "value": "X"}, {"system": "urn:a", "value": "P1"})
    check_same_patient(server, _ours({"system": "urn:a", "value": "P1"}, {"system": "urn:b", "value": "B"}), "s")
    with pytest.raises(DeliveryRejected):  # a further identifier of ours proves nothing
        check_same_patient(_server_study({"system": "urn:b", "value": "B"}),
                           _ours({"system": "urn:a", "value": "P1"}, {"system": "urn:b", "value": "B"}), "s")


def test_the_server_subject_and_endpoint_replace_bundle_local_references():
    ours = {"subject": {"reference": "urn:uuid:p", "identifier": {"value": "1"}},
            "endpoint": [{"reference": "urn:uuid:e"}]}
    server = {"subject": {"reference": "Patient/7"}, "endpoint": [{"reference": "Endpoint/3"}]}
    assert keep_server_references(ours, server) == {"subject": {"reference": "Patient/7", "identifier": {"value": "1"}},
                                                    "endpoint": [{"reference": "Endpoint/3"}]}


def endpoint_ref(reference: str, address: str) -> dict:
    return {"reference": reference, "identifier": {"system": "urn:ietf:rfc:3986", "value": address}}


def test_a_local_endpoint_reference_becomes_the_servers_reference_with_the_same_identifier():
    # After merge_imaging_study the body holds the server's references and ours (a union).
    server = {"subject": {"reference": "Patient/7"}, "endpoint": [endpoint_ref("Endpoint/3", "https://a")],
              "series": [{"uid": "1", "endpoint": [endpoint_ref("Endpoint/3", "https://a")]}]}
    ours = {"subject": {"reference": "Patient/7"},
            "endpoint": [endpoint_ref("Endpoint/3", "https://a"), endpoint_ref("urn:uuid:a", "https://a")],
            "series": [{"uid": "1", "endpoint": [endpoint_ref("urn:uuid:a", "https://a")]}]}
    assert keep_server_references(ours, server) == server


def test_an_endpoint_the_server_has_no_reference_for_stays_local_beside_the_servers():
    server = {"endpoint": [endpoint_ref("Endpoint/3", "https://a")]}
    ours = {"endpoint": [endpoint_ref("Endpoint/3", "https://a"), endpoint_ref("urn:uuid:a", "https://a"),
                         endpoint_ref("urn:uuid:b", "https://b")]}
    assert keep_server_references(ours, server)["endpoint"] == [endpoint_ref("Endpoint/3", "https://a"),
                                                                endpoint_ref("urn:uuid:b", "https://b")]


def test_a_server_reference_without_identifier_is_matched_by_its_included_endpoints_address():
    server = {"endpoint": [{"reference": "Endpoint/3"}]}
    ours = {"endpoint": [{"reference": "Endpoint/3"}, endpoint_ref("urn:uuid:a", "https://a")]}
    included = ({"resourceType": "Endpoint", "id": "3", "address": "https://a"},)
    assert keep_server_references(ours, server, included)["endpoint"] == [{"reference": "Endpoint/3"}]


def test_an_endpoint_new_to_the_study_is_created_in_the_update_transaction():
    bundle = {"entry": [{"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient"}},
                        {"fullUrl": "urn:uuid:e", "resource": {"resourceType": "Endpoint"}},
                        {"fullUrl": "urn:uuid:s", "resource": {"resourceType": "ImagingStudy"}}]}
    body = {"resourceType": "ImagingStudy", "subject": {"reference": "Patient/7"},
            "endpoint": [{"reference": "urn:uuid:e"}]}
    request = update_request(body, ServerStudy("s1", "4", {}), bundle)
    assert [e.get("fullUrl") for e in request["entry"]] == ["urn:uuid:e", None]
    assert request["entry"][1]["request"] == {"method": "PUT", "url": "ImagingStudy/s1", "ifMatch": 'W/"4"'}


def test_a_merge_without_new_references_is_a_plain_put():
    body = {"resourceType": "ImagingStudy", "subject": {"reference": "Patient/7"}}
    assert update_request(body, ServerStudy("s1", "4", {}), {"entry": []}) is None
