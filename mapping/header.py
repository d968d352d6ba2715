"""InstanceHeader: the slim, immutable set of values the mapping needs from one instance.

Built once per received instance (the Dataset is dropped at once), so it must be cheap and
robust: only the four UIDs are required; a malformed value in any other element is dropped
and recorded as a warning naming the tag and the problem (never the value, which may be a
patient's name or ID).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydicom.charset import python_encoding
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from mapping.codes import CodedValue
from mapping.errors import MappingError
from mapping.names import PersonName

# C0 controls other than tab, CR, LF: FHIR strings must not contain them (codes not even those).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_ESCAPE_SEQUENCE = re.compile(r"\x1b[\x20-\x2f]*[\x30-\x7e]")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # a UID must also be a valid FHIR id (series/instance uid)


@dataclass(frozen=True, slots=True)
class Issuer:
    """IssuerOfAccessionNumberSequence (0008,0051) item: HL7 v2 HD components."""

    local: str = ""  # LocalNamespaceEntityID (0040,0031)
    universal: str = ""  # UniversalEntityID (0040,0032)
    universal_type: str = ""  # UniversalEntityIDType (0040,0033): ISO, URI, UUID, DNS, ...


@dataclass(frozen=True, slots=True)
class RequestAttributes:
    """RequestAttributesSequence (0040,0275) item: the request (order) the instance was acquired for."""

    accession_number: str = ""  # AccessionNumber (0008,0050)
    accession_issuer: Issuer | None = None  # IssuerOfAccessionNumberSequence (0008,0051)
    requested_procedure_id: str = ""  # RequestedProcedureID (0040,1001)
    placer_order: str = ""  # PlacerOrderNumberImagingServiceRequest (0040,2016)
    placer_issuer: Issuer | None = None  # OrderPlacerIdentifierSequence (0040,0026)
    filler_order: str = ""  # FillerOrderNumberImagingServiceRequest (0040,2017)
    filler_issuer: Issuer | None = None  # OrderFillerIdentifierSequence (0040,0027)
    reason_codes: tuple[CodedValue, ...] = ()  # ReasonForRequestedProcedureCodeSequence (0040,100A)


@dataclass(frozen=True, slots=True)
class IdQualifiers:
    """IssuerOfPatientIDQualifiersSequence (0010,0024) item: the issuer as a universal ID."""

    universal: str = ""  # UniversalEntityID (0040,0032)
    universal_type: str = ""  # UniversalEntityIDType (0040,0033): ISO, URI, UUID, DNS, ...
    type_code: str = ""  # IdentifierTypeCode (0040,0035): an HL7 v2 table 0203 code (MR, PI, ...)


@dataclass(frozen=True, slots=True)
class PatientIdentity:
    """A patient ID with its issuer: the instance's own PatientID (0010,0020) or an item of
    OtherPatientIDsSequence (0010,1002), each with IssuerOfPatientID (0010,0021),
    TypeOfPatientID (0010,0022) and IssuerOfPatientIDQualifiersSequence (0010,0024)."""

    patient_id: str = ""
    issuer: str = ""  # IssuerOfPatientID (0010,0021)
    type_of_patient_id: str = ""  # TypeOfPatientID (0010,0022): TEXT, RFID, BARCODE (the medium)
    qualifiers: IdQualifiers | None = None


@dataclass(frozen=True, slots=True)
class ReferencedSeries:
    """A series (and instances of it) that a selecting instance references: a Key Object
    Selection's evidence, a SEG's source images, an RT Structure Set's contour images."""

    series_uid: str  # "": not given (SEG source images outside ReferencedSeriesSequence)
    study_uid: str = ""  # "": the referencing instance's own study
    instances: tuple[tuple[str, str], ...] = ()  # (ReferencedSOPInstanceUID, ReferencedSOPClassUID)
    frame_of_reference: str = ""  # RTSTRUCT: the FrameOfReferenceUID its series is referenced under


# The SOP classes whose references become ImagingSelections (R5; mapping/selection.py).
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What the mapping reads from one instance (strings decoded, unusable values dropped)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    # patient
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_id_qualifiers: IdQualifiers | None = None  # IssuerOfPatientIDQualifiersSequence (0010,0024)
    other_patient_ids: tuple[PatientIdentity, ...] = ()  # OtherPatientIDsSequence (0010,1002)
    patient_name: PersonName | None = None
    patient_sex: str = ""
    patient_birth_date: str = ""
    # study
    accession_number: str = ""
    accession_issuer: Issuer | None = None
    study_date: str = ""
    study_time: str = ""
    timezone_offset: str = ""
    study_description: str = ""
    referring_physician: PersonName | None = None
    reading_physicians: tuple[PersonName, ...] = ()
    procedure_codes: tuple[CodedValue, ...] = ()
    reason_codes: tuple[CodedValue, ...] = ()
    reason_text: str = ""
    request_attributes: tuple[RequestAttributes, ...] = ()  # RequestAttributesSequence (0040,0275)
    institution_name: str = ""
    department_name: str = ""
    # series
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    laterality: str = ""
    image_laterality: str = ""
    series_date: str = ""
    series_time: str = ""
    performing_physicians: tuple[PersonName, ...] = ()  # PerformingPhysicianName (0008,1050)
    operators: tuple[PersonName, ...] = ()  # OperatorsName (0008,1070)
    # instance
    instance_number: int | None = None
    number_of_frames: int | None = None  # NumberOfFrames (0028,0008)
    concept_name: CodedValue | None = None
    document_title: str = ""
    image_type: tuple[str, ...] = ()
    # what a KOS, SEG or RTSTRUCT references (empty for every other SOP class)
    references: tuple[ReferencedSeries, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def patient_identity(self) -> PatientIdentity:
        """The instance's own PatientID with its issuer (the primary identifier)."""
        return PatientIdentity(self.patient_id, self.issuer_of_patient_id, "", self.patient_id_qualifiers)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceHeader:
        """Read the header values from a pydicom Dataset (see the module docstring).

        Raises MappingError naming the tag and the instance when one of the four UIDs is
        missing, empty or not a valid UID (it must also be a FHIR id: at most 64 characters).
        """
        if not isinstance(ds, Dataset):
            raise TypeError(f"ds: expected a pydicom Dataset, got {type(ds).__name__}")
        r = _Reader(ds)
        sop_instance_uid = r.uid(0x00080018, "")
        # in this order: which missing UID is reported first stays as it was
        study_uid, series_uid = r.uid(0x0020000D, sop_instance_uid), r.uid(0x0020000E, sop_instance_uid)
        sop_class_uid = r.uid(0x00080016, sop_instance_uid)
        return cls(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            patient_id=r.text(0x00100020),
            issuer_of_patient_id=r.text(0x00100021),
            patient_id_qualifiers=r.first_item(0x00100024, _qualifiers),
            other_patient_ids=r.all_items(0x00101002, _identity),
            patient_name=r.person(0x00100010),
            patient_sex=r.code_string(0x00100040),
            patient_birth_date=r.code_string(0x00100030),
            accession_number=r.text(0x00080050),
            accession_issuer=r.first_item(0x00080051, _issuer),
            study_date=r.code_string(0x00080020),
            study_time=r.code_string(0x00080030),
            timezone_offset=r.code_string(0x00080201),
            study_description=r.text(0x00081030),
            referring_physician=r.person(0x00080090),
            reading_physicians=r.people(0x00081060),
            procedure_codes=r.codes(0x00081032),
            reason_codes=r.codes(0x0040100A),
            reason_text=r.text(0x00401002),
            request_attributes=r.all_items(0x00400275, _request, what="request item"),
            institution_name=r.text(0x00080080),
            department_name=r.text(0x00081040),
            modality=r.code_string(0x00080060),
            series_number=r.integer(0x00200011),
            series_description=r.text(0x0008103E),
            body_part=r.code_string(0x00180015),
            laterality=r.code_string(0x00200060),
            image_laterality=r.code_string(0x00200062),
            series_date=r.code_string(0x00080021),
            series_time=r.code_string(0x00080031),
            performing_physicians=r.people(0x00081050),
            operators=r.people(0x00081070),
            instance_number=r.integer(0x00200013),
            number_of_frames=r.integer(0x00280008),
            concept_name=r.first_item(0x0040A043, _code),
            document_title=r.text(0x00420010, multi=False),
            image_type=r.texts(0x00080008),
            references=_references(r, sop_class_uid),
            warnings=tuple(r.warnings),
        )


# Every top-level element InstanceHeader.from_dataset reads (the character set included):
# a reader may hand it a Dataset of these alone (convert's fast path, scp.sources.header_bytes)
# and get the same header. tests/test_mapping_header_tags.py checks from_dataset reads no other.
HEADER_TAGS = frozenset({
    0x00080005, 0x00080008, 0x00080016, 0x00080018, 0x00080020, 0x00080021, 0x00080030, 0x00080031,
    0x00080050, 0x00080051, 0x00080060, 0x00080080, 0x00080090, 0x00080201, 0x00081030, 0x00081032,
    0x0008103E, 0x00081040, 0x00081050, 0x00081060, 0x00081070, 0x00081115,
    0x00100010, 0x00100020, 0x00100021, 0x00100024, 0x00100030, 0x00100040, 0x00101002,
    0x00180015, 0x0020000D, 0x0020000E, 0x00200011, 0x00200013, 0x00200060, 0x00200062, 0x00280008,
    0x00280103,  # PixelRepresentation: pydicom hands it to a sequence's items when it reads one
    0x00400275, 0x00401002, 0x0040100A, 0x0040A043, 0x0040A375, 0x00420010,
    0x30060010,  # ReferencedFrameOfReferenceSequence (RTSTRUCT)
    0x52009229, 0x52009230,  # Shared / Per-frame Functional Groups (SEG source images)
})


# Character sets whose bytes can be decoded directly (no ISO 2022 code extensions, and a
# backslash byte is always the value separator): the common case, decoded without pydicom's
# per-element conversion machinery, which costs more than reading the file.
_DIRECT_CHARSETS = MappingProxyType({
    **{term: codec for term, codec in python_encoding.items()
       if term.startswith("ISO_IR") and term not in ("ISO_IR 13", "ISO_IR 6")},
    "": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 192": "utf_8",
})


class _Reader:
    """Reads elements of one dataset, turning any failure into a warning about that tag."""

    __slots__ = ("ds", "elements", "warnings", "codec")

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        # The Dataset's element dict, read directly: Dataset.get_item's key conversion costs
        # more than everything else here (pydicom 3.x keeps elements in ``_dict`` by tag).
        self.elements = getattr(ds, "_dict", None)
        self.warnings: list[str] = []
        self.codec: str | None = None  # None: let pydicom decode text with its character set
        try:
            charset = self._element(0x00080005)
            if charset is None:
                self.codec = "latin_1"
            else:
                value = charset.value  # pydicom usually converted it already, to decode text
                if isinstance(value, bytes):
                    value = value.decode("latin_1").split("\\")
                elif isinstance(value, str):
                    value = [value]
                terms = [str(v).strip(" \0") for v in value or [""]]
                if len(terms) == 1:
                    self.codec = _DIRECT_CHARSETS.get(terms[0])
        except Exception:
            self.codec = None

    def _element(self, tag: int) -> Any:
        """The element, raw when pydicom has not converted it yet; None when absent."""
        if not isinstance(self.elements, dict):
            return self.ds.get_item(tag)
        element = self.elements.get(tag)
        if isinstance(element, RawDataElement) and element.value is None:
            return self.ds.get_item(tag)  # a deferred read: let pydicom load it
        return element

    def _value(self, tag: int) -> Any:
        try:
            element = self.ds.get(tag)
            return None if element is None else element.value
        except Exception as exc:  # pydicom raises many types on a malformed value
            self._warn(tag, f"unreadable value ({type(exc).__name__})")
            return None

    def _strings(self, tag: int, *, encoded: bool = True, multi: bool = False) -> tuple[str, ...] | None:
        """The values of a string element (None when absent), decoded directly when possible."""
        try:
            element = self._element(tag)
            if element is None:
                return None
            if isinstance(element, RawDataElement) and element.value is not None and (self.codec or not encoded):
                text = element.value.decode(self.codec if encoded else "latin_1", errors="replace")
                text = self.clean(tag, text.rstrip(" \0"))  # NUL pads UIDs: padding, not content
                return tuple(v.strip(" \0\t\r\n") for v in (text.split("\\") if multi else [text]))
        except Exception:
            pass  # the slow path below reports the problem
        value = self._value(tag)
        if value is None:
            return None
        try:
            if isinstance(value, (list, MultiValue)):
                return tuple(self.clean(tag, _one(v).rstrip(" \0")).strip() for v in value)
            return (self.clean(tag, _one(value).rstrip(" \0")).strip(),)
        except Exception as exc:
            self._warn(tag, f"unusable value ({type(exc).__name__})")
            return None

    def _warn(self, tag: int, problem: str, action: str = "dropped") -> None:
        self.warnings.append(f"{_name(tag)}: {problem}, {action}")

    def clean(self, tag: int, text: str) -> str:
        """text without the control characters FHIR refuses (recorded as a warning)."""
        cleaned = clean_text(text)
        if cleaned != text:
            self._warn(tag, "control characters", "removed")
        return cleaned

    def uid(self, tag: int, sop_instance_uid: str) -> str:
        values = self._strings(tag, encoded=False, multi=True)
        text = values[0] if values else ""
        if not text:
            where = f" in instance {sop_instance_uid}" if sop_instance_uid else ""
            state = "missing" if values is None else "empty"
            raise MappingError(f"{_name(tag)} is {state}{where}: required to map the instance")
        if not _FHIR_ID.fullmatch(text):
            where = f" in instance {sop_instance_uid}" if sop_instance_uid else ""
            raise MappingError(f"{_name(tag)} is not a valid UID{where}: required to map the instance")
        return text

    def text(self, tag: int, *, encoded: bool = True, multi: bool = True) -> str:
        """A single-valued text (the first value when a sender sent several)."""
        values = self._strings(tag, encoded=encoded, multi=multi)
        return values[0] if values else ""

    def code_string(self, tag: int) -> str:
        """CS, DA, TM, UI, IS: ASCII by definition, whatever the character set (whitespace
        inside collapsed: some become FHIR codes)."""
        return " ".join(self.text(tag, encoded=False).split())

    def texts(self, tag: int) -> tuple[str, ...]:
        values = self._strings(tag, multi=True)
        return values if values and any(values) else ()

    def integer(self, tag: int) -> int | None:
        values = self._strings(tag, encoded=False, multi=True)
        if not values or not values[0]:
            return None
        try:
            number = float(values[0])
            if number != int(number):
                raise ValueError("not an integer")
            return int(number)
        except (ValueError, OverflowError):
            self._warn(tag, "not an integer")
            return None

    def person(self, tag: int) -> PersonName | None:
        names = self.people(tag)
        return names[0] if names else None

    def people(self, tag: int) -> tuple[PersonName, ...]:
        try:
            element = self._element(tag)
            if element is None:
                return ()
            if isinstance(element, RawDataElement) and element.value is not None and self.codec:
                text = self.clean(tag, element.value.decode(self.codec, errors="replace").rstrip(" \0"))
                names = (PersonName.from_text(v.strip(" \0")) for v in text.split("\\"))
                return tuple(n for n in names if n)
        except Exception:
            pass  # the slow path below reports the problem
        value = self._value(tag)
        if value is None or value == "":
            return ()
        try:
            values = value if isinstance(value, (list, MultiValue)) else [value]
            names = (_person(v) for v in values)
            return tuple(PersonName(*(self.clean(tag, group) for group in (n.alphabetic, n.ideographic, n.phonetic)))
                         for n in names if n)
        except Exception as exc:
            self._warn(tag, f"unusable name ({type(exc).__name__})")
            return ()

    def items(self, tag: int) -> list[Dataset]:
        value = self._value(tag)
        if value is None:
            return []
        if not isinstance(value, (DicomSequence, list)) or not all(isinstance(i, Dataset) for i in value):
            self._warn(tag, "not a sequence")
            return []
        return list(value)

    def codes(self, tag: int) -> tuple[CodedValue, ...]:
        return self.all_items(tag, _code, what="code item")

    def all_items(self, tag: int, build: Callable[[Dataset, Callable[[str], str]], Any],
                  what: str = "item") -> tuple[Any, ...]:
        """Every item built (None results left out); an item that cannot be read is dropped with a warning."""
        result = []
        for item in self.items(tag):
            try:
                built = build(item, lambda text: self.clean(tag, text))
            except Exception as exc:
                self._warn(tag, f"unusable {what} ({type(exc).__name__})")
                continue
            if built is not None:
                result.append(built)
        return tuple(result)

    def first_item(self, tag: int, build: Callable[[Dataset], Any]) -> Any:
        items = self.items(tag)
        if not items:
            return None
        try:
            return build(items[0], lambda text: self.clean(tag, text))
        except Exception as exc:
            self._warn(tag, f"unusable item ({type(exc).__name__})")
            return None


def _name(tag: int) -> str:
    t = Tag(tag)
    keyword = keyword_for_tag(t)
    return f"{keyword} ({t.group:04X},{t.element:04X})" if keyword else f"({t.group:04X},{t.element:04X})"


def _one(value: Any) -> str:
    """A single-valued text element as str (the first value when a sender sent several)."""
    if isinstance(value, (list, MultiValue)):
        value = value[0] if len(value) else ""
    if isinstance(value, bytes):
        raise ValueError("undecoded bytes")
    return str(value)


def _person(value: Any) -> PersonName:
    if hasattr(value, "alphabetic"):  # pydicom PersonName: groups decoded with the character set
        return PersonName(value.alphabetic or "", value.ideographic or "", value.phonetic or "")
    return PersonName.from_text(_one(value))


def clean_text(text: str) -> str:
    """text without C0 control characters, which FHIR strings and codes must not hold.

    ISO 2022 escape sequences (a sender using Japanese or Korean without declaring it in
    SpecificCharacterSet) are decoded when they can be, else removed with the rest.
    """
    if not _CONTROL.search(text):
        return text
    if "\x1b" in text:
        try:
            text = text.encode("latin_1").decode("iso2022_jp_2")
        except (UnicodeEncodeError, UnicodeDecodeError):
            text = _ESCAPE_SEQUENCE.sub("", text)
    return _CONTROL.sub("", text)


def _item_text(item: Dataset, keyword: str, clean: Callable[[str], str]) -> str:
    value = item.get(keyword)
    return "" if value is None else clean(_one(value)).strip()


def _code(item: Dataset, clean: Callable[[str], str]) -> CodedValue | None:
    value = (_item_text(item, "CodeValue", clean) or _item_text(item, "LongCodeValue", clean)
             or _item_text(item, "URNCodeValue", clean))
    meaning = _item_text(item, "CodeMeaning", clean)
    if not value and not meaning:
        return None
    return CodedValue(" ".join(value.split()), " ".join(_item_text(item, "CodingSchemeDesignator", clean).split()),
                      meaning, _item_text(item, "CodingSchemeVersion", clean))


def _issuer(item: Dataset, clean: Callable[[str], str]) -> Issuer | None:
    issuer = Issuer(_item_text(item, "LocalNamespaceEntityID", clean), _item_text(item, "UniversalEntityID", clean),
                    _item_text(item, "UniversalEntityIDType", clean))
    return issuer if issuer.local or issuer.universal else None


def _qualifiers(item: Dataset, clean: Callable[[str], str]) -> IdQualifiers | None:
    qualifiers = IdQualifiers(_item_text(item, "UniversalEntityID", clean),
                              " ".join(_item_text(item, "UniversalEntityIDType", clean).split()),
                              " ".join(_item_text(item, "IdentifierTypeCode", clean).split()))
    return qualifiers if qualifiers.universal or qualifiers.type_code else None


def _identity(item: Dataset, clean: Callable[[str], str]) -> PatientIdentity | None:
    """An OtherPatientIDsSequence (0010,1002) item; None when it has no PatientID."""
    patient_id = _item_text(item, "PatientID", clean)
    if not patient_id:
        return None
    sequence = item.get("IssuerOfPatientIDQualifiersSequence")  # its value: a Sequence, or None
    qualifiers = _qualifiers(sequence[0], clean) if sequence else None
    return PatientIdentity(patient_id, _item_text(item, "IssuerOfPatientID", clean),
                           " ".join(_item_text(item, "TypeOfPatientID", clean).split()), qualifiers)


def _first_issuer(item: Dataset, keyword: str, clean: Callable[[str], str]) -> Issuer | None:
    sequence = item.get(keyword)  # its value: a Sequence, or None
    return _issuer(sequence[0], clean) if sequence else None


def _request(item: Dataset, clean: Callable[[str], str]) -> RequestAttributes | None:
    """A RequestAttributesSequence (0040,0275) item; None when it names no request and gives no reason."""
    codes = (_code(code, clean) for code in item.get("ReasonForRequestedProcedureCodeSequence") or ())
    request = RequestAttributes(
        accession_number=_item_text(item, "AccessionNumber", clean),
        accession_issuer=_first_issuer(item, "IssuerOfAccessionNumberSequence", clean),
        requested_procedure_id=_item_text(item, "RequestedProcedureID", clean),
        placer_order=_item_text(item, "PlacerOrderNumberImagingServiceRequest", clean),
        placer_issuer=_first_issuer(item, "OrderPlacerIdentifierSequence", clean),
        filler_order=_item_text(item, "FillerOrderNumberImagingServiceRequest", clean),
        filler_issuer=_first_issuer(item, "OrderFillerIdentifierSequence", clean),
        reason_codes=tuple(c for c in codes if c is not None))
    return request if request != RequestAttributes() else None


# --- what selecting instances reference -------------------------------------------------------


def _references(r: _Reader, sop_class_uid: str) -> tuple[ReferencedSeries, ...]:
    """The series and instances a KOS, SEG or RTSTRUCT references (read only for those classes,
    so other instances cost nothing); an item with a missing or invalid UID is dropped with a
    warning naming the sequence."""
    if sop_class_uid == KEY_OBJECT_SELECTION:
        # CurrentRequestedProcedureEvidenceSequence (0040,A375) > ReferencedSeriesSequence > ReferencedSOPSequence
        return _flat(r.all_items(0x0040A375, _evidence_study))
    if sop_class_uid == SEGMENTATION:
        # ReferencedSeriesSequence (0008,1115) > ReferencedInstanceSequence (0008,114A); source
        # images named only in the functional groups' DerivationImageSequence > SourceImageSequence
        # follow without a series (the mapping finds it among the study's instances).
        listed = r.all_items(0x00081115, lambda item, clean: _series(item, "ReferencedInstanceSequence"))
        known = {uid for series in listed for uid, _ in series.instances}
        sources = [source for group in (0x52009229, 0x52009230) for sources in r.all_items(group, _source_images)
                   for source in sources if source[0] not in known]
        extra = (ReferencedSeries("", "", tuple(dict.fromkeys(sources))),) if sources else ()
        return (*listed, *extra)
    if sop_class_uid == RT_STRUCTURE_SET:
        # ReferencedFrameOfReferenceSequence (3006,0010) > RTReferencedStudySequence >
        # RTReferencedSeriesSequence > ContourImageSequence
        return _flat(r.all_items(0x30060010, lambda item, clean: _flat(
            _rt_study(study, _item_uid(item, "FrameOfReferenceUID", required=False))
            for study in item.get("RTReferencedStudySequence") or [])))
    return ()


def _flat(groups: Any) -> tuple[ReferencedSeries, ...]:
    return tuple(series for group in groups for series in group)


def _item_uid(item: Dataset, keyword: str, required: bool = True) -> str:
    value = item.get(keyword)
    text = "" if value is None else _one(value).strip(" \0")
    if not text and not required:
        return ""
    if not _FHIR_ID.fullmatch(text):
        raise ValueError(f"{keyword} missing or not a valid UID")
    return text


def _instances(items: Any) -> tuple[tuple[str, str], ...]:
    return tuple((_item_uid(i, "ReferencedSOPInstanceUID"), _item_uid(i, "ReferencedSOPClassUID"))
                 for i in items or [])


def _series(item: Dataset, instances: str, study_uid: str = "") -> ReferencedSeries:
    return ReferencedSeries(_item_uid(item, "SeriesInstanceUID"), study_uid, _instances(item.get(instances)))


def _evidence_study(item: Dataset, clean: Callable[[str], str]) -> tuple[ReferencedSeries, ...]:
    study_uid = _item_uid(item, "StudyInstanceUID", required=False)
    return tuple(_series(s, "ReferencedSOPSequence", study_uid) for s in item.get("ReferencedSeriesSequence") or [])


def _rt_study(item: Dataset, frame_of_reference: str) -> tuple[ReferencedSeries, ...]:
    # RTReferencedStudySequence items name the study by ReferencedSOPInstanceUID
    study_uid = _item_uid(item, "ReferencedSOPInstanceUID", required=False)
    return tuple(dataclasses.replace(_series(s, "ContourImageSequence", study_uid),
                                     frame_of_reference=frame_of_reference)
                 for s in item.get("RTReferencedSeriesSequence") or [])


def _source_images(group: Dataset, clean: Callable[[str], str]) -> tuple[tuple[str, str], ...]:
    """A functional group's DerivationImageSequence > SourceImageSequence items."""
    return tuple(source for derivation in group.get("DerivationImageSequence") or []
                 for source in _instances(derivation.get("SourceImageSequence")))
