"""mapping: pure DICOM → FHIR R4 conversion (no sockets, files, clocks or globals).

Public API (see ../shared/mapping.md for the rules):

    convert_study(datasets, options) -> StudyResources
        One study's instance headers (pydicom Datasets, pixel data not needed)
        → Patient, ImagingStudy, optional Endpoint (fhir.resources.R4B models).
        Raises PatientMismatchError when instances disagree on PatientID,
        MultipleStudiesError when they span several StudyInstanceUIDs.

    convert_datasets(datasets, options) -> dict[str, StudyResources]
        Any number of instances, grouped by StudyInstanceUID (first-seen order).

    to_bundle(resources) -> Bundle          transaction Bundle (output shape "bundle")
    to_contained(resources) -> ImagingStudy  Patient/Endpoint contained ("contained")
    render(resources, shape) -> dict         JSON-ready dict of either shape
    merge_imaging_study(existing, new) -> ImagingStudy
        Union by series/instance UID, never erases values, idempotent.
"""
