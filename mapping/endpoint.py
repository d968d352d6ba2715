"""The Endpoint resource: where the study's images can be fetched (DICOMweb WADO-RS)."""

from __future__ import annotations

from typing import Any

CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
# Endpoint has no search parameter on its address: the identifier (the address as a URI)
# is what a conditional create (ifNoneExist) can match on.
ADDRESS_IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"


def endpoint_address(dicomweb_url: str) -> str:
    """The DICOMweb root URL (a trailing ``/studies`` or slash removed)."""
    address = dicomweb_url.strip().rstrip("/")
    if address.endswith("/studies"):
        address = address[: -len("/studies")]
    return address


def endpoint_json(dicomweb_url: str) -> dict[str, Any]:
    address = endpoint_address(dicomweb_url)
    return {
        "resourceType": "Endpoint",
        "identifier": [{"system": ADDRESS_IDENTIFIER_SYSTEM, "value": address}],
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"},
        "name": f"DICOM WADO-RS endpoint {address}",
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }
