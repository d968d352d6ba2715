"""dicom-fhir-scp: the network node (Storage SCP, spool, completion, delivery)."""

__version__ = "0.1.0"
