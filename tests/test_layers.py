"""The import direction: data flows receive (or a folder) → store → pipeline → mapping → sinks,
and a layer imports only from the layers below it.

Parsed from the source (every import, those inside functions included), so a layer cannot
quietly reach up, and no module imports another module's private names. pynetdicom's
internals are touched in one module only (scp/receive/transport.py), so a pynetdicom
upgrade has one file to re-check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# Lowest first. A module may import from its own group and from any group of a lower row;
# groups on one row are peers and do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("mapping",),  # pure DICOM → FHIR: imports nothing of scp
    ("scp", "scp.errors", "scp.config", "scp.logs"),  # what every layer shares
    ("scp.web",),  # bounded HTTP to servers not trusted (the FHIR sink, a DICOMweb client)
    ("scp.senders",),  # who sent a study and what follows from it (receive and pipeline both read it)
    ("scp.dicom",),
    ("scp.store",),
    ("scp.ops",),
    ("scp.sinks",),
    ("scp.pipeline",),
    ("scp.receive", "scp.sources"),  # the sources of instances
    ("scp.node",),
    ("scp.commands",),
    ("scp.cli",),
    ("scp.__main__",),
)
TRANSPORT = "scp.receive.transport"
PYNETDICOM_INTERNALS = frozenset({"dul", "dimse", "acse", "primitive", "event_queue", "_config"})


def group_of(module: str) -> tuple[int, str] | None:
    """(row, group) of a project module; None for a module outside the project."""
    best = None
    for row, groups in enumerate(LAYERS):
        for group in groups:
            if module == group or module.startswith(group + "."):
                if best is None or len(group) > len(best[1]):
                    best = (row, group)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def violations(module: str, source: str) -> list[str]:
    """What is wrong with one module's imports (empty: nothing)."""
    here = group_of(module)
    assert here is not None, f"{module} is in no layer: add its package to LAYERS"
    tree = ast.parse(source)
    problems = []
    for target, names, line in imports(tree):
        where = group_of(target)
        if where is not None and where[1] != here[1] and where[0] >= here[0]:
            kind = "a peer" if where[0] == here[0] else "a layer above"
            problems.append(f"{module}:{line} imports {target} ({kind}: {where[1]})")
        for name in names if where is not None else ():  # the project's own modules
            if name.startswith("_") and not name.startswith("__"):
                problems.append(f"{module}:{line} imports the private name {name} from {target}")
        if target.startswith("pynetdicom") and (target.split(".")[-1].startswith("_")
                                                or PYNETDICOM_INTERNALS.intersection(names)):
            if module != TRANSPORT:
                problems.append(f"{module}:{line} uses pynetdicom internals ({target}); only {TRANSPORT} may")
    if module != TRANSPORT and module.startswith("scp."):
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in PYNETDICOM_INTERNALS:
                problems.append(f"{module}:{node.lineno} reaches into pynetdicom's .{node.attr}; "
                                f"only {TRANSPORT} may")
    return problems


def project_modules() -> list[Path]:
    return sorted(p for package in ("scp", "mapping") for p in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_a_module_imports_only_from_its_own_layer_and_those_below(path):
    assert violations(module_name(path), path.read_text(encoding="utf-8")) == []


def test_every_package_of_the_project_is_in_a_layer():
    packages = {module_name(p.parent) for p in project_modules() if p.name == "__init__.py"}
    assert [p for p in sorted(packages) if group_of(p) is None] == []


def test_an_import_from_a_layer_above_is_found():
    assert violations("scp.store.spool", "from scp.pipeline.worker import DeliveryWorker\n") == [
        "scp.store.spool:1 imports scp.pipeline.worker (a layer above: scp.pipeline)"]


def test_an_import_inside_a_function_counts_too():
    source = "def f():\n    import scp.node\n"
    assert violations("scp.sinks.disk", source) == ["scp.sinks.disk:2 imports scp.node (a layer above: scp.node)"]


def test_peers_on_one_row_do_not_import_each_other():
    assert violations("scp.sources.folder", "from scp.receive.dataset import parse_received\n") == [
        "scp.sources.folder:1 imports scp.receive.dataset (a peer: scp.receive)"]


def test_mapping_imports_nothing_of_scp():
    assert violations("mapping.study", "from scp.errors import DeliveryRejected\n") == [
        "mapping.study:1 imports scp.errors (a layer above: scp.errors)"]


def test_another_modules_private_name_is_not_imported():
    assert violations("scp.store.dead_letter", "from scp.store.spool import _move\n") == [
        "scp.store.dead_letter:1 imports the private name _move from scp.store.spool"]


def test_pynetdicom_internals_are_used_in_the_transport_module_only():
    source = "from pynetdicom import _config\n\ndef f(event):\n    return event.assoc.dul.socket\n"
    assert violations(TRANSPORT, source) == []
    assert violations("scp.receive.handlers", source) == [
        "scp.receive.handlers:1 uses pynetdicom internals (pynetdicom); only scp.receive.transport may",
        "scp.receive.handlers:4 reaches into pynetdicom's .dul; only scp.receive.transport may"]
