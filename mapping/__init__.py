"""mapping: pure DICOM → FHIR R4 (or R5) conversion (no sockets, files, clocks or globals).

The rules are mapping/README.md. Resources are FHIR JSON dicts throughout; fhir.resources
models appear only at the edge (validate_resources, to_bundle, to_contained), where a study
leaves the process. Public API (everything importable from ``mapping``):

    InstanceHeader.from_dataset(ds) -> InstanceHeader
        The slim, immutable set of values the mapping needs from one instance (strings
        decoded with the dataset's SpecificCharacterSet). Raises MappingError naming the
        tag when StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID or SOPClassUID is
        missing, empty or not a valid UID (it must also be a FHIR id: at most 64
        characters). A malformed optional value is dropped and named in ``warnings``.
        Cheap: the node and the folder converter build one per instance and drop the
        Dataset at once.

    StudyResources(study_uid, patient, imaging_study, endpoints=(), warnings=(), selections=(), fhir_version="R4")
        One study's resources as plain JSON-ready dicts (``patient``, ``imaging_study``, and
        ``endpoints``: a tuple of Endpoint dicts, one per DICOMweb address, the first one
        first; a union over merged parts): exactly what fhir.resources.R4B writes for them
        (``model_dump_json(exclude_none=True)``: its element order and dateTime form), so
        output files are the same bytes they were when the mapping built models. Not
        validated: see validate_resources. Treat the dicts as read-only (merges share
        unchanged parts). Canonical form: the ImagingStudy refers to the Patient and
        Endpoint by the ``urn:uuid:`` fullUrls of the bundle shape (deterministic uuid5
        values, so the same input always gives the same output). ``warnings``:
        human-readable lines about values that were dropped or replaced (never quoting
        patient names or IDs), for the caller to log.
        ``selections`` (R5 only, else empty): one ImagingSelection dict per series that a
        Key Object Selection, Segmentation or RT Structure Set instance references
        (mapping.selection; mapping/README.md section 13), referring to the Patient and the
        ImagingStudy by their fullUrls; rendered by both shapes, read back by
        parse_resources, a union by identifier in merge_resources.

    validate_resources(resources) -> None
        The edge: raises MappingError naming the study, the resource and up to five
        failing elements (never their values) when a resource is not valid R4 (a bug, or a
        value no rule caught). Sinks call it before writing or sending; call it before
        handing the dicts to anything that expects valid FHIR.
        Selections are checked with fhir.resources' R5 ImagingSelection.

    convert_study(instances, options=MappingOptions()) -> StudyResources
        One study's instances (InstanceHeader or pydicom Dataset, any order).
        Raises MultipleStudiesError (several StudyInstanceUIDs, naming them),
        PatientMismatchError (instances disagree on PatientID), MappingError (no instances).
        A repeated SOPInstanceUID counts once (the last one wins).

    convert_datasets(datasets, options) -> dict[str, StudyResources]
        Any number of instances, grouped by StudyInstanceUID (first-seen order).

    to_bundle(resources) -> Bundle          transaction Bundle (output shape "bundle"), validated
    to_contained(resources) -> ImagingStudy  Patient/Endpoint contained ("contained"), validated
        Models for library users; MappingError as validate_resources when not valid R4.
    render(resources, shape) -> dict         JSON-ready dict of either shape (not validated)
    parse_resources(document, fhir_version=None) -> StudyResources
        The inverse of render for either shape (render(parse_resources(render(r, s)), s)
        == render(r, s)); raises MappingError for a document that is neither shape or is
        not structurally a study this tool wrote: one ImagingStudy with a study UID
        identifier, its subject a Patient in the document, Endpoints with an address,
        and the JSON types merging relies on (lists of objects; series and instances with
        a string uid, integer numbers and counts, string dates, identifiers and codings).
        Values are not validated: what is made of the document is, when it leaves. The
        warnings are not part of a document.

    merge_imaging_study(existing, new) -> dict
        Two ImagingStudy dicts of one study. Union by series/instance UID (a resent instance replaces its earlier version),
        counts recomputed, a value missing from ``new`` never erases one in ``existing``,
        identifiers/modalities/endpoints unions without duplicates, idempotent. The
        existing subject is kept. Raises PatientMismatchError when both subjects carry an
        identifier and they differ.
    merge_resources(existing, new) -> StudyResources
        The same for a whole study (Patient values filled in, never overwritten; raises
        PatientMismatchError when the patients' identifiers differ, MappingError when the
        two are different studies). Elements a merge adds go where FHIR's element order
        puts them, as in a converted resource. Neither merge validates.

FHIR R5: MappingOptions(fhir_version="R5") renders the same mapping as R5 (mapping.r5,
mapping/README.md section 13); StudyResources.fhir_version says which release its dicts are,
and validation, both shapes and both merges follow it. parse_resources reads the release from
the document (fhir_version: render an R4 document as R5, refuse R5 asked for as R4).

The helpers every reader or writer of FHIR JSON shares (the study UID system and its
search token, identifier comparison, canonical JSON, validation naming places) live in
mapping.fhirjson; the sinks use them from there.
"""

import logging as _logging

# A library logs through its own loggers and leaves the handlers to the application
# (the command line configures them in scp.cli).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())


from mapping.errors import (ConfigurationError, DicomFhirError, MappingError, MultipleStudiesError,
                            PatientMismatchError)
from mapping.header import InstanceHeader
from mapping.merge import merge_imaging_study, merge_resources
from mapping.options import SHAPES, MappingOptions
from mapping.shapes import parse_resources, render, to_bundle, to_contained
from mapping.study import StudyResources, convert_datasets, convert_study, validate_resources

__all__ = [
    "ConfigurationError", "DicomFhirError", "MappingError", "MultipleStudiesError", "PatientMismatchError",
    "SHAPES", "MappingOptions", "InstanceHeader", "StudyResources", "convert_datasets", "convert_study",
    "parse_resources", "render", "to_bundle", "to_contained", "merge_imaging_study", "merge_resources",
    "validate_resources",
]
