"""The product never imports its experiments: no module of lora_audit outside lora_audit.studies
imports lora_audit.studies (absolutely, relatively, or through importlib by name). The studies'
commands reach the command line through the entry-point group only."""

from __future__ import annotations

import ast
from pathlib import Path

import lora_audit
from lora_audit.cli import COMMANDS, PLUGIN_GROUP

PACKAGE = Path(lora_audit.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against its own package."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "lora_audit.studies" in node.value:
            out.add(node.value)  # importlib.import_module("lora_audit.studies..."), "module:attr" registries
    return out


def test_no_product_module_imports_the_studies():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "studies" in path.relative_to(PACKAGE).parts:
            continue
        hits = sorted(m for m in _imported_modules(path) if m == "lora_audit.studies" or m.startswith("lora_audit.studies."))
        if hits:
            offenders[str(path.relative_to(PACKAGE))] = hits
    assert offenders == {}


def test_the_import_scan_sees_relative_imports(tmp_path):
    # The scanner itself: a relative import of the studies from a product module is resolved.
    mods = _imported_modules(PACKAGE / "studies" / "cli.py")
    assert "lora_audit.commands._common" in mods


def test_studies_commands_come_from_the_entry_point_group():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUP)}
    assert names.get("demo") == "lora_audit.studies.cli:demo"
    assert names.get("zoo") == "lora_audit.studies.cli:zoo"
    assert not {"demo", "zoo"} & set(COMMANDS)
