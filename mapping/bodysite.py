"""Series bodySite and laterality: DICOM defined terms → SNOMED CT Codings.

The tables are data files shipped with the package (mapping/data/), derived from DICOM
PS3.16: Annex L (Body Part Examined ↔ CID 4 anatomic region) and the laterality codes.
"""

from __future__ import annotations

from importlib.resources import files
from types import MappingProxyType
from typing import Any

from mapping.codes import SNOMED_SYSTEM


def _load(name: str) -> MappingProxyType[str, tuple[str, str]]:
    table: dict[str, tuple[str, str]] = {}
    text = files("mapping").joinpath("data", name).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for line in lines[1:]:  # the first is the column header
        term, code, display = line.split("\t")
        table[term.strip()] = (code.strip(), display.strip())
    return MappingProxyType(table)


BODY_PARTS = _load("body_parts.tsv")
LATERALITIES = _load("laterality.tsv")


def body_site(body_part_examined: str) -> dict[str, Any] | None:
    """Coding for BodyPartExamined; an unknown term keeps its text as display only."""
    term = body_part_examined.strip()
    if not term:
        return None
    known = BODY_PARTS.get(term.upper())
    if known is None:
        return {"display": term}
    code, display = known
    return {"system": SNOMED_SYSTEM, "code": code, "display": display}


def laterality(value: str) -> dict[str, Any] | None:
    """Coding for Laterality/ImageLaterality (R, L, B, U); None for anything else."""
    known = LATERALITIES.get(value.strip().upper())
    if known is None:
        return None
    code, display = known
    return {"system": SNOMED_SYSTEM, "code": code, "display": display}
