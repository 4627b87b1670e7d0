"""The package shape of docs/architecture.md, enforced: dependency rules between packages and file sizes."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dendrite_convert"
ROOT = PACKAGE.name

# Which packages each package may import (itself included); cli/ and integrations/ may import anything.
ALLOWED = {
    "core": {"core"},
    "conversion": {"core", "conversion"},
    "training": {"core", "conversion", "training"},
    "exporting": {"core", "conversion", "exporting"},
}
PACKAGES = {*ALLOWED, "cli", "integrations"}
MAX_FILE_LINES = 400
MAX_COMMAND_LINES = 80  # cli/<command>.py: typed options and a call into the library, nothing more


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every `dendrite_convert...` module `path` imports (absolute or relative, at any depth of the file)."""
    top = next(parent for parent in path.parents if parent.name == ROOT)
    package = [ROOT, *path.relative_to(top).with_suffix("").parts]
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
            # `from pkg import name`: `name` may be a module; the first two parts decide the package anyway
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return [(line, name) for line, name in found if name == ROOT or name.startswith(f"{ROOT}.")]


def _package_of(module: str) -> str:
    """The package a module belongs to; the root itself (whose __init__ imports every package) is `<root>`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "<root>"


def test_packages_import_only_what_the_dependency_rules_allow():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2 or parts[0] not in ALLOWED:
            continue
        for line, module in _imported_modules(path):
            target = _package_of(module)
            if target not in ALLOWED[parts[0]]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} "
                                  f"({parts[0]} may import only {', '.join(sorted(ALLOWED[parts[0]]))})")
    assert not violations, "dependency rules of docs/architecture.md broken:\n" + "\n".join(violations)


def test_no_module_is_too_long_and_cli_commands_stay_thin():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        relative = path.relative_to(PACKAGE.parent)
        if lines > MAX_FILE_LINES:
            violations.append(f"{relative}: {lines} lines (at most {MAX_FILE_LINES})")
        is_command = path.parent.name == "cli" and not path.name.startswith("_")
        if is_command and lines > MAX_COMMAND_LINES:
            violations.append(f"{relative}: {lines} lines (a CLI command module has at most {MAX_COMMAND_LINES})")
    assert not violations, "modules over their size:\n" + "\n".join(violations)


def test_the_import_scanner_sees_relative_absolute_and_local_imports(tmp_path):
    """The checks above are only as good as the scanner: it must resolve every import form."""
    fake = tmp_path / ROOT / "core"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text(
        "import os\n"
        f"import {ROOT}.training.loop\n"
        "from ..conversion import config\n"
        "from .layers import DendriteLayer\n"
        "def f():\n"
        "    from ..exporting.fold import fold_model\n"
        "    from .. import __version__\n"
    )
    found = [name for _, name in _imported_modules(fake / "x.py")]
    assert found == [f"{ROOT}.training.loop", f"{ROOT}.conversion.config", f"{ROOT}.core.layers.DendriteLayer",
                     f"{ROOT}.exporting.fold.fold_model", f"{ROOT}.__version__"]
    assert [_package_of(name) for name in found] == ["training", "conversion", "core", "exporting", "<root>"]


def test_the_version_lives_in_core_and_the_package_metadata_reads_it_there():
    """Saved directories record the version; conversion and exporting read it from core, not from the root."""
    import tomllib

    import dendrite_convert
    from dendrite_convert.core.version import __version__

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": f"{ROOT}.core.version.__version__"}
    assert dendrite_convert.__version__ == __version__
