"""Identifier systems: FHIR requires an absolute URI; DICOM issuers are often OIDs or bare names."""

from __future__ import annotations

import re

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+")


def as_system(text: str, kind: str = "") -> str | None:
    """An identifier system for an issuer: an OID becomes ``urn:oid:…``, a UUID ``urn:uuid:…``,
    an absolute URI stays; anything else (a bare name such as ``RIS``) is None.

    kind: the HL7 v2 universal ID type when known (ISO, UUID, URI, ...).
    """
    text = text.strip()
    kind = kind.strip().upper()
    if not text:
        return None
    if _OID.fullmatch(text) and kind in ("", "ISO"):
        return "urn:oid:" + text
    if _UUID.fullmatch(text) and kind in ("", "UUID"):
        return "urn:uuid:" + text.lower()
    if _ABSOLUTE_URI.fullmatch(text):
        return text
    return None


def is_absolute_uri(text: str) -> bool:
    return bool(_ABSOLUTE_URI.fullmatch(text.strip()))
