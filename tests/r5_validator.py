"""An R5 validator independent of fhir.resources: HL7's own FHIR R5 JSON schema.

The schema is ``openapi/fhir.schema.json`` of the ``hl7.fhir.r5.core`` 5.0.0 package (HL7's
R5 core package, from the npm registry: tests/r5_schema, installed by tests/run.d/r5_schema.sh),
checked with the ``jsonschema`` library (draft-06, the schema's own dialect). It checks what a
JSON schema can: element names (no unknown ones: every definition is closed), JSON types,
cardinality of arrays vs single values, required elements, primitive patterns (ids, dateTimes,
codes, uris). It does not check invariants (FHIRPath), code sets or terminology
bindings; fhir.resources' R5 models and the FHIR engine cover other ground, which is the point
of having two.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

SCHEMA = Path(__file__).parent / "r5_schema" / "node_modules" / "hl7.fhir.r5.core" / "openapi" / "fhir.schema.json"
MAX_ERRORS = 10  # per resource: enough to see what is wrong, short enough to read


def require_r5_schema() -> Path:
    """The schema file, or skip (fail when CI=true) when tests/run.sh has not installed it."""
    if not SCHEMA.is_file():
        message = f"{SCHEMA} not found (bash tests/run.sh installs hl7.fhir.r5.core into tests/r5_schema)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if importlib.util.find_spec("jsonschema") is None:  # installed with the test extras
        pytest.fail("the jsonschema package is missing: pip install -e '.[test]'")
    return SCHEMA


@functools.cache
def _definitions() -> dict[str, Any]:
    return json.loads(require_r5_schema().read_text(encoding="utf-8"))["definitions"]


@functools.cache
def _validator(resource_type: str) -> Any:
    import jsonschema
    # The root of the document is the resource's definition; references (#/definitions/...)
    # resolve within the same document.
    return jsonschema.Draft6Validator({"$ref": f"#/definitions/{resource_type}", "definitions": _definitions()})


def validate_r5(resource: dict[str, Any]) -> list[str]:
    """The errors HL7's R5 JSON schema finds in one resource (empty: valid), each naming the
    element path. A Bundle's entries and contained resources are also checked one by one, so
    their errors name the element (the schema's ResourceList only says "none of 150 types")."""
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(kind, str) or kind not in _definitions() or "resourceType" not in (
            _definitions()[kind].get("properties") or {}):
        return [f"{kind!r} is not an R5 resource type"]
    errors: list[str] = []
    for error in sorted(_validator(kind).iter_errors(resource), key=lambda e: list(map(str, e.path))):
        path = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "oneOf" and ("contained" in error.absolute_path or "resource" in error.absolute_path):
            continue  # reported below, resource by resource
        errors.append(f"{kind}{'.' + path if path else ''}: {error.message[:300]}")
    for i, contained in enumerate(resource.get("contained") or []):
        errors += [f"{kind}.contained[{i}].{e}" for e in validate_r5(contained)]
    for i, entry in enumerate(resource.get("entry") or [] if kind == "Bundle" else []):
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            errors += [f"Bundle.entry[{i}].{e}" for e in validate_r5(entry["resource"])]
    return errors[:MAX_ERRORS] if len(errors) > MAX_ERRORS else errors


def validate_r5_all(resources: list[dict[str, Any]]) -> dict[int, list[str]]:
    """validate_r5 for many resources: {index: errors} for those that fail (in-process, so no batching needed)."""
    return {i: errors for i, resource in enumerate(resources) if (errors := validate_r5(resource))}
