"""The Endpoint resource: where the study's images can be fetched (DICOMweb WADO-RS)."""

from __future__ import annotations

from typing import Any

CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
# Endpoint has no search parameter on its address: the identifier (the address as a URI)
# is what a conditional create (ifNoneExist) can match on.
ADDRESS_IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"
# IHE IMR: the payload type coded as DICOM (DCM 113014 "DICOM"), besides the text.
DICOM_PAYLOAD = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "113014", "display": "DICOM"}


def address_identifier(address: str) -> dict[str, Any]:
    """The Endpoint's identifier, also carried by every Reference to it, so a server's copy of a
    reference can be told apart from another Endpoint's (merging endpoints by address)."""
    return {"system": ADDRESS_IDENTIFIER_SYSTEM, "value": address}


def endpoint_address(dicomweb_url: str) -> str:
    """The DICOMweb root URL (a trailing ``/studies`` or slash removed): the WADO-RS base URL
    SMART Imaging Access expects, to which a client appends ``/studies/{StudyInstanceUID}``."""
    address = dicomweb_url.strip().rstrip("/")
    if address.endswith("/studies"):
        address = address[: -len("/studies")]
    return address


def endpoint_json(dicomweb_url: str) -> dict[str, Any]:
    address = endpoint_address(dicomweb_url)
    return {
        "resourceType": "Endpoint",
        "identifier": [address_identifier(address)],
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"},
        "name": f"DICOM WADO-RS endpoint {address}",
        "payloadType": [{"coding": [dict(DICOM_PAYLOAD)], "text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }
