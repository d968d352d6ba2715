"""DICOM person names (PN) → FHIR HumanName.

A PN value has up to three ``=``-separated groups: alphabetic, ideographic, phonetic
(PS3.5 6.2.1); each has five ``^``-separated components: family, given, middle, prefix,
suffix. pydicom decodes each group with the dataset's SpecificCharacterSet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EN_REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"


@dataclass(frozen=True, slots=True)
class PersonName:
    """The three groups of one PN value, decoded (empty string = group absent)."""

    alphabetic: str = ""
    ideographic: str = ""
    phonetic: str = ""

    def __bool__(self) -> bool:
        return bool(_components(self.alphabetic) or _components(self.ideographic) or _components(self.phonetic))

    @classmethod
    def from_text(cls, text: str) -> PersonName:
        """From the DICOM string form ``Alphabetic=Ideographic=Phonetic``."""
        groups = (text.split("=") + ["", ""])[:3]
        return cls(*groups)


def _components(group: str) -> list[str]:
    parts = [part.strip() for part in group.split("^")[:5]]
    return parts + [""] * (5 - len(parts)) if any(parts) else []


def human_name(group: str, *, use: str | None = None, representation: str | None = None) -> dict[str, Any] | None:
    """A HumanName for one group; None when it holds nothing."""
    parts = _components(group)
    if not parts:
        return None
    family, given, middle, prefix, suffix = parts
    name: dict[str, Any] = {}
    if representation is not None:
        name["extension"] = [{"url": EN_REPRESENTATION, "valueCode": representation}]
    if use is not None:
        name["use"] = use
    if family:
        name["family"] = family
    givens = given.split() + middle.split()
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def human_names(name: PersonName | None) -> list[dict[str, Any]]:
    """The Patient's names: the alphabetic group as the ``usual`` name, then the ideographic
    (IDE) and phonetic (SYL) groups marked with the EN representation extension."""
    if name is None:
        return []
    names = [
        human_name(name.alphabetic, use="usual"),
        human_name(name.ideographic, representation="IDE"),
        human_name(name.phonetic, representation="SYL"),
    ]
    return [n for n in names if n is not None]


def display_name(name: PersonName | None) -> str | None:
    """A readable one-line name (``Prefix Given Middle Family Suffix``) for display-only references.

    The alphabetic group when present, else the ideographic, else the phonetic.
    """
    if name is None:
        return None
    for group in (name.alphabetic, name.ideographic, name.phonetic):
        parts = _components(group)
        if parts:
            family, given, middle, prefix, suffix = parts
            return " ".join(p for p in (prefix, given, middle, family, suffix) if p)
    return None
