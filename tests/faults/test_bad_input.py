"""Case 8: the bad-input catalogue. One table across the three commands (`bln-train`,
`bln-sweep` with its launchers, `bln-analyze`): every row is a real subprocess in an empty
directory that must answer with exactly one line on stderr naming the key and what is valid,
exit with code 2, and leave the directory empty (no sweep dir, no mlflow.db, no journal, no
Hydra outputs/). Rows fail before any training, so each takes a few seconds.

Rows marked xfail are bugs (see their reasons); the fix makes them pass (strict).
"""

import pytest

from tests.faults.conftest import cli

TRAIN, SWEEP, ANALYZE = "bln_sweeps.train", "launchers", "analysis"
NAMES = {TRAIN: "bln-train", SWEEP: "bln-sweep", ANALYZE: "bln-analyze"}


def bug(reason: str):
    return pytest.mark.xfail(strict=True, reason=f"bug: {reason}")


TOP_LEVEL = "an unknown key in a sweep section is answered with the run's top-level keys"
FILE_URI = "an unsupported tracking URI is a traceback with exit code 1, not a ConfigError"
#  (command, arguments, the key the line must name, a valid choice it must list)
CATALOGUE = [
    # ---- bln-train ----
    (TRAIN, ["norm=foo"], "norm", "layernorm"),
    (TRAIN, ["model=huge"], "model", "gpt2_124m"),
    (TRAIN, ["seq=s9999"], "seq", "s1024"),
    (TRAIN, ["-m", "norm=layernorm,bogus"], "norm", "rmsnorm"),
    (TRAIN, ["optim.lrr=1"], "optim.lrr", "lr"),
    (TRAIN, ["trian.steps=3"], "trian.steps", "train"),
    (TRAIN, ["optim.lr=abc"], "optim.lr", "type"),
    (TRAIN, ["norm=bln", "norm.options.zetaa=1"], "norm.options.zetaa", "zeta"),
    (TRAIN, ["seq=s4096", "model.block_size=1024"], "seq.len", "block_size"),
    (TRAIN, ["optim.lr=0"], "optim.lr", "> 0"),
    (TRAIN, ["train.steps=0"], "train.steps", "> 0"),
    (TRAIN, ["batch=b8", "batch.tokens_per_step=1000"], "batch.tokens_per_step", "multiple"),
    (TRAIN, ["optim.warmup_frac=1.5"], "optim.warmup_frac", "[0, 1)"),
    (TRAIN, ["train.device=tpu"], "train.device", "cuda:N"),
    (TRAIN, ["train.dtype=float16"], "train.dtype", "bfloat16"),
    (TRAIN, ["norm.final=nope"], "norm.final", "layernorm"),
    (TRAIN, ["eval.bln_switches=[TTXF]"], "eval.bln_switches", "TTFF"),
    (TRAIN, ["data=tokens", "data.path=/nonexistent/shards"], "data.path", "bln-prepare"),
    (TRAIN, ["train.fault=explode@3"], "train.fault", "raise@STEP"),
    pytest.param(TRAIN, ["tracking.uri=file:///tmp/mlruns"], "tracking.uri", "sqlite"),
    # ---- bln-sweep ----
    (SWEEP, ["nrom=layernorm,bln"], "nrom", "norm"),
    (SWEEP, ["norm=layernorm,bogus"], "norm", "layernorm"),
    (SWEEP, ["seq=glob(nothing*)"], "seq", "empty axis"),
    (SWEEP, ["seed=0,1"], "seed", "search.confirm_seeds"),
    (SWEEP, ["optim.lr=1e-3,2e-3"], "optim.lr", "grid axis"),
    (SWEEP, ["search.n_trials=0"], "search.n_trials", ">= 1"),
    (SWEEP, ["search.sampler=anneal"], "search.sampler", "tpe"),
    (SWEEP, ["search.pruner=sometimes"], "search.pruner", "median"),
    (SWEEP, ["search.metric=train/loss"], "search.metric", "val/loss"),
    (SWEEP, ["search.params={optim.lr:'interval(3, 1)'}"], "optim.lr", "low < high"),
    (SWEEP, ["train.fault=oops"], "train.fault", "oom@STEP"),
    (SWEEP, ["storage=nowhere"], "storage", "embedded"),
    (SWEEP, ["launcher=nowhere"], "launcher", "local"),
    (SWEEP, ["launcher.workers=0"], "launcher.workers", ">= 1"),
    (SWEEP, ["launcher.timeout_min=0"], "launcher.timeout_min", ">= 1"),
    (SWEEP, ["launcher=slurm", "+launcher.slurm.partiton=x"], "partiton", "partition"),
    (SWEEP, ["launcher=slurm", "launcher.slurm.mem_gb=-1"], "launcher.slurm.mem_gb", "> 0"),
    (SWEEP, ["launcher=slurm", "+launcher.slurm.time=5"], "launcher.slurm.time", "timeout_min"),
    (SWEEP, ["--detatch"], "--detatch", "--detach"),
    (SWEEP, ["status", "nosuch"], "nosuch", "sweeps"),
    pytest.param(
        SWEEP,
        ["launcher=slurm", "launcher.slurm.partiton=x"],
        "partiton",
        "partition",
    ),
    pytest.param(SWEEP, ["launcher.workres=3"], "launcher.workres", "workers"),
    pytest.param(SWEEP, ["search.n_trails=3"], "search.n_trails", "n_trials"),
    pytest.param(SWEEP, ["tracking.uri=file:///tmp/mlruns"], "tracking.uri", "sqlite"),
    # ---- bln-analyze ----
    (ANALYZE, [], "--experiment", "sweeps"),
    (ANALYZE, ["nosuch"], "nosuch", "sweeps"),
    (ANALYZE, ["x", "--format", "pdf"], "pdf", "json"),
    (ANALYZE, ["x", "--via", "bogus"], "--via", "client"),
    (ANALYZE, ["x", "--colour"], "--colour", "--help"),
    (ANALYZE, ["--experiment", "nosuch", "--tracking-uri", "{store}"], "nosuch", "cat"),
    (
        ANALYZE,
        ["--experiment", "cat", "--tracking-uri", "{store}", "--metric", "val/nope"],
        "val/nope",
        "val/loss@batch",
    ),
    (
        ANALYZE,
        ["--experiment", "cat", "--tracking-uri", "{store}", "--baseline", "bn"],
        "bn",
        "rmsnorm",
    ),
    (
        ANALYZE,
        ["--experiment", "cat", "--tracking-uri", "{store}", "--axes", "nope"],
        "nope",
        "seq.len",
    ),
    (
        ANALYZE,
        ["--experiment", "cat", "--tracking-uri", "{store}", "--filter", "params.x=="],
        "params.x==",
        "filter",
    ),
    pytest.param(
        ANALYZE,
        ["x", "--tracking-uri", "file:///tmp/mlruns"],
        "tracking",
        "sqlite",
    ),
    pytest.param(ANALYZE, ["x", "--tracking-uri", "ftp://nowhere"], "tracking", "sqlite"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A tracking store with four finished runs (layernorm, rmsnorm x 2 seeds), for the
    bln-analyze rows that need an existing experiment."""
    from bln_sweeps.tracking import RunLogger

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    for norm in ("layernorm", "rmsnorm"):
        for seed in (0, 1):
            params = {"norm.name": norm, "batch.size": 8, "seq.len": 64, "seed": seed}
            run = RunLogger.start(uri, "cat", params=params, tags={"kind": "single"})
            run.log_metrics({"val/loss": 5.0 + seed / 10, "val/loss@batch": 5.2}, step=10)
            run.end()
    return uri


def test_the_catalogue_covers_every_command():
    rows = [getattr(row, "values", row) for row in CATALOGUE]
    assert len(rows) >= 25
    assert {cmd for cmd, *_ in rows} == {TRAIN, SWEEP, ANALYZE}


@pytest.mark.parametrize(
    "command, args, key, hint",
    CATALOGUE,
    ids=[f"{NAMES[r[0]]} {' '.join(r[1])}" for r in (getattr(r, "values", r) for r in CATALOGUE)],
)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(
    command, args, key, hint, tmp_path, request
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if "{store}" in args:
        args = [request.getfixturevalue("store") if a == "{store}" else a for a in args]
    p = cli(command, *args, cwd=cwd, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, f"exit {p.returncode}:\n{p.stderr[-2000:]}"
    assert key in lines[0] and hint in lines[0], lines[0]
    assert lines[0].startswith(("bln-train: error:", "bln-sweep: error:", "bln-analyze: error:"))
    assert list(cwd.iterdir()) == []  # no sweep dir, no mlflow.db, no journal, no outputs/
