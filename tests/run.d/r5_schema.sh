# HL7's FHIR R5 core package (its JSON schema, openapi/fhir.schema.json) for the independent R5
# validator (tests/r5_validator.py); the npm registry carries the package as HL7 publishes it.
(cd tests/r5_schema && npm ci --no-audit --no-fund --loglevel=error)
