"""Dependencies run one way (launchers -> bln_sweeps <- analysis); login-node modules stay light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_top_names(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found.update((str(path.relative_to(ROOT)), n.split(".")[0]) for n in names)
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("bln_sweeps", {"launchers", "analysis"}),
        ("launchers", {"analysis"}),
        ("analysis", {"launchers"}),
    ],
)
def test_import_direction(package, forbidden):
    bad = sorted(f"{f} imports {n}" for f, n in _imported_top_names(package) if n in forbidden)
    assert not bad, bad


def test_packages_resolve_inside_repo():
    import analysis
    import bln_sweeps
    import launchers

    for mod in (bln_sweeps, launchers, analysis):
        assert Path(mod.__file__).resolve().is_relative_to(ROOT), mod.__file__


@pytest.mark.parametrize(
    "module", ["bln_sweeps", "bln_sweeps.config", "bln_sweeps.tracking", "analysis"]
)
def test_login_node_modules_do_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0, module
