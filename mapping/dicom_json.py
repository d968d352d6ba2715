"""DICOM JSON (PS3.18 F.2, what WADO-RS /metadata and QIDO-RS return) -> InstanceHeader, pure.

The same rules as a Part 10 file: the JSON object becomes a pydicom Dataset and then
``InstanceHeader.from_dataset``, so both inputs share every mapping rule. Two things
differ from a file:

- DICOM JSON is UTF-8 whatever SpecificCharacterSet says (PS3.18 F.2.1: the attribute is
  kept but the values are already Unicode). The values arrive as str and are never decoded
  again; SpecificCharacterSet is replaced by ISO_IR 192 so pydicom never tries to apply the
  source's (ISO 2022, say) to text that is no longer in it.
- Bulk data (BulkDataURI) is never fetched: the header needs none of it.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from mapping.errors import MappingError
from mapping.header import InstanceHeader

SPECIFIC_CHARACTER_SET = "00080005"
STUDY_INSTANCE_UID = "0020000D"


def _no_bulk_data(*_args: Any) -> bytes:
    """BulkDataURI handler: never fetch (the header needs no bulk data)."""
    return b""


def dataset_from_dicom_json(obj: dict[str, Any]) -> Dataset:
    """One DICOM JSON object as a pydicom Dataset, its text already Unicode (see the module docstring).

    Raises TypeError when obj is not a dict, MappingError naming the instance (when its UID
    can be read) for an object pydicom cannot read.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"obj: expected a DICOM JSON object (dict), got {type(obj).__name__}")
    try:
        ds = Dataset.from_json(obj, bulk_data_uri_handler=_no_bulk_data)
    except Exception as exc:  # pydicom raises many types for a malformed object
        sop = _first_value(obj, "00080018")
        where = f" of instance {sop}" if sop else ""
        raise MappingError(f"DICOM JSON{where} cannot be read: {type(exc).__name__}: {exc}") from exc
    if SPECIFIC_CHARACTER_SET in obj or "SpecificCharacterSet" in ds:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def header_from_dicom_json(obj: dict[str, Any]) -> InstanceHeader:
    """The InstanceHeader of one DICOM JSON instance (the same rules as InstanceHeader.from_dataset)."""
    return InstanceHeader.from_dataset(dataset_from_dicom_json(obj))


def _first_value(obj: dict[str, Any], tag: str) -> str:
    """The first value of a tag of a DICOM JSON object, '' when absent or not a string."""
    element = obj.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values and isinstance(values[0], str) else ""


def study_uid_of(obj: dict[str, Any]) -> str:
    """StudyInstanceUID of a DICOM JSON object (a QIDO-RS result), '' when absent."""
    return _first_value(obj, STUDY_INSTANCE_UID)


def first_value(obj: dict[str, Any], tag: str) -> Any:
    """The first value of tag (8 hex digits) in a DICOM JSON object, None when absent."""
    element = obj.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None
