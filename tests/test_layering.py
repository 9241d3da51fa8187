"""Dependencies run one way (launchers -> bln_sweeps <- analysis); login-node modules stay light."""

import ast
import re
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


# Everything a login node runs: composing and checking configs, planning and submitting a
# sweep, the tracking names and URIs, reading results. None of it may pay for importing torch.
LOGIN_NODE = [
    "bln_sweeps",
    "bln_sweeps.config",
    "bln_sweeps.compose",
    "bln_sweeps.cli",
    "bln_sweeps.prepare",
    "bln_sweeps.synthetic",
    "bln_sweeps.identity",
    "bln_sweeps.tracking",
    "bln_sweeps.tracking.contract",
    "bln_sweeps.tracking.uri",
    "bln_sweeps.sweep.space",
    "bln_sweeps.sweep.manifest",
    "bln_sweeps.sweep.budget",
    "bln_sweeps.sweep.design",
    "bln_sweeps.sweep.stop",
    "launchers.cli",
    "launchers.prepare",
    "launchers.plan",
    "launchers.queue",
    "launchers.submit",
    "launchers.slurm",
    "launchers.requeue",
    "launchers.cost",
    "launchers.ui",
    "hydra_plugins.bln_launcher.bln_launcher",
    "analysis",
    "analysis.load",
    "analysis._mlflow_sql",
    "analysis.cells",
]


def test_login_node_modules_do_not_import_torch():
    code = (
        "import importlib, sys\n"
        f"for m in {LOGIN_NODE!r}:\n"
        "    importlib.import_module(m)\n"
        "    if 'torch' in sys.modules: sys.exit(m)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{done.stderr.strip()} imports torch at module load"


def _imports(path: Path) -> set[str]:
    """Dotted names a module imports, at any depth (lazy imports in functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


TRAINING_CODE = (
    "bln_sweeps.train",
    "bln_sweeps.build",
    "bln_sweeps.model",
    "bln_sweeps.norms",
    "bln_sweeps.data",
    "bln_sweeps.evaluate",
    "bln_sweeps.checkpoint",
    "bln_sweeps.distributed",
    "bln_sweeps.leak",
    "bln_sweeps.sweep.worker",
)


def test_analysis_never_imports_training_code():
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules("analysis")
        for name in _imports(path)
        if name.startswith(TRAINING_CODE) or name == "torch"
    ]
    assert not bad, bad


def test_bln_train_has_no_import_circle():
    """`bln-train` is bln_sweeps.cli:main; nothing in the core imports the CLI back."""
    bad = [
        str(path.relative_to(ROOT))
        for path in _modules("bln_sweeps")
        if path.name != "cli.py" and any(n.startswith("bln_sweeps.cli") for n in _imports(path))
    ]
    assert not bad, bad


def _code_strings(path: Path):
    """(line, text) of every string constant that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                yield node.lineno, node.value


def test_tracking_names_come_from_the_contract_only():
    """Metric names and dotted tag names are spelled in bln_sweeps/tracking/contract.py alone;
    every other module imports them (a renamed metric cannot leave a reader behind)."""
    from bln_sweeps.tracking import contract

    names = {
        v
        for k, v in vars(contract).items()
        if isinstance(v, str) and (k.endswith("_TAG") and "." in v or "/" in v)
    }
    assert {"val/loss", "test/loss", "perf/mfu", "optuna.study", "git.sha"} <= names
    owner = ROOT / "bln_sweeps" / "tracking" / "contract.py"
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for package in ("bln_sweeps", "launchers", "analysis", "hydra_plugins")
        for path in _modules(package)
        if path != owner
        for line, text in _code_strings(path)
        if text in names or text in {f"tags.{n}" for n in names}
    ]
    assert not bad, bad


def test_optuna_private_api_has_one_door():
    """Only bln_sweeps/sweep/optuna_internals.py reaches into Optuna's private attributes."""
    private = {"_storage", "_trial_id", "_study_id"}
    door = ROOT / "bln_sweeps" / "sweep" / "optuna_internals.py"
    bad = [
        f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}"
        for package in ("bln_sweeps", "launchers", "analysis")
        for path in _modules(package)
        if path != door
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in private
    ]
    assert not bad, bad


MLFLOW_TABLE = re.compile(
    r"\b(from|join)\s+(runs|tags|params|latest_metrics|metrics|experiments)\b", re.I
)


def test_only_one_module_knows_mlflow_tables():
    """SQL on MLflow's tables lives in analysis/_mlflow_sql.py; everything else asks it or
    MLflow's client (the schema changes between MLflow versions)."""
    owner = ROOT / "analysis" / "_mlflow_sql.py"
    bad = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in ("bln_sweeps", "launchers", "analysis")
        for path in _modules(package)
        if path != owner
        for line, text in _code_strings(path)
        if MLFLOW_TABLE.search(text)
    ]
    assert not bad, bad


def test_launcher_defaults_live_in_conf_only():
    """conf/launcher/*.yaml is the one list of launcher defaults: the schema has types only."""
    from dataclasses import MISSING as NO_DEFAULT
    from dataclasses import fields

    from omegaconf import MISSING

    from bln_sweeps.config import LauncherConfig

    given = [
        f.name
        for f in fields(LauncherConfig)
        if f.default not in (NO_DEFAULT, MISSING) or f.default_factory is not NO_DEFAULT
    ]
    assert not given, f"LauncherConfig repeats conf/launcher defaults: {given}"


def test_model_flavours_live_in_conf_only():
    """conf/model/*.yaml is the one list of model flavours: no table of them in code."""
    flavours = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    assert {"tiny", "gpt2_124m"} <= flavours
    bad = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in ("bln_sweeps", "launchers", "hydra_plugins")
        for path in _modules(package)
        for line, text in _code_strings(path)
        if text == "gpt2_124m"
    ]
    assert not bad, bad


def test_no_module_outgrows_one_job():
    """A module past ~400 lines holds more than one job (the redesign's rule)."""
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for package in ("bln_sweeps", "launchers", "analysis", "hydra_plugins")
        for path in _modules(package)
        if (n := len(path.read_text().splitlines())) > 420
    ]
    assert not long, long
