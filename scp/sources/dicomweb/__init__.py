"""Studies pulled from a DICOMweb server (`dicom-fhir-scp sync`).

    client      the one place HTTP requests to the DICOMweb server are made (bounded: a
                timeout per request, a response size cap, a rate limit, retries)
    windows     pure: StudyDate windows, splitting one that reaches the page size
    checkpoint  what a backfill has done, in the spool folder, written atomically
    backfill    QIDO-RS windows -> WADO-RS metadata -> the mapping -> the sinks
    follow      Orthanc's /changes feed and generic polling after the backfill
"""
