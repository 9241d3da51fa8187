"""Case 8: the bad-input catalogue. One table across the three commands (`bln-train`,
`bln-sweep` with its launchers, `status` and `ui`, `bln-analyze`): every row must answer with
exactly one line on stderr naming the key, the bad value and what is valid, exit with code 2,
and leave every file it could touch as it was: the working directory (no sweep dir, no
mlflow.db, no journal, no Hydra outputs/), the sweep directory and the stores the row points at
(each file hashed before and after). No row prints a URL password.

The rows run in this process, through the same `main` functions the console scripts call
(`bln_sweeps.cli.train_main`, `launchers.cli.main`, `analysis.cli.main`): a fresh interpreter
per row would cost ~5 s of imports each, and every row fails before any training or submission.
One subprocess row checks that the console entry points agree with the in-process answer.
"""

import hashlib
import json
import socket
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import cli

TRAIN, SWEEP, ANALYZE = "bln-train", "bln-sweep", "bln-analyze"
PASSWORD = "pw/with:special%40chars"  # as written in a URL ('/' and ':' unescaped, '@' escaped)
SECRET = "special"  # any fragment of the password that a masked line must not show
LOOKALIKE = "lay\u0435rnorm"  # Cyrillic 'е' in place of the Latin 'e'

#  (command, arguments, the key the line must name, a valid choice or rule it must state)
#  `{file}` is an existing regular file, `{store}` a tracking store with four runs, `{garbage}` a
#  file that is not a database, `{deaf}` a port that accepts connections and never answers.
CATALOGUE = [
    # ---- bln-train: config groups, keys and types ----
    (TRAIN, ["norm=foo"], "norm", "layernorm"),
    (TRAIN, ["model=huge"], "model", "gpt2_124m"),
    (TRAIN, ["seq=s9999"], "seq", "s1024"),
    (TRAIN, ["batch=b3"], "batch", "b4"),
    (TRAIN, ["optim=sgd"], "optim", "adamw"),
    (TRAIN, ["data=web"], "data", "synthetic"),
    (TRAIN, ["tracking=cloud"], "tracking", "embedded"),
    (TRAIN, ["-m", "norm=layernorm,bogus"], "norm", "rmsnorm"),
    (TRAIN, [f"norm={LOOKALIKE}"], "norm", "layernorm"),
    (TRAIN, ["-m", f"norm=rmsnorm,{LOOKALIKE}"], "norm", "layernorm"),
    (TRAIN, ["optim.lrr=1"], "optim.lrr", "lr"),
    (TRAIN, ["trian.steps=3"], "trian.steps", "train"),
    (TRAIN, ["model.n_heads=4"], "model.n_heads", "n_head"),
    (TRAIN, ["optim.lr=abc"], "optim.lr", "type"),
    (TRAIN, ["train.steps=1.5"], "train.steps", "type"),
    (TRAIN, ["optim.beta1=high"], "optim.beta1", "type"),
    (TRAIN, ["norm=bln", "norm.options.zetaa=1"], "norm.options.zetaa", "zeta"),
    # ---- bln-train: values no schema bounds ----
    (TRAIN, ["seq=s4096", "model.block_size=1024"], "seq.len", "block_size"),
    (TRAIN, ["seq.len=1"], "seq.len", ">= 2"),
    (TRAIN, ["optim.lr=0"], "optim.lr", "> 0"),
    (TRAIN, ["optim.lr=-1e-3"], "optim.lr", "> 0"),
    (TRAIN, ["optim.lr=inf"], "optim.lr", "finite"),
    (TRAIN, ["optim.lr=nan"], "optim.lr", "finite"),
    (TRAIN, ["train.steps=0"], "train.steps", "> 0"),
    (TRAIN, ["train.eval_interval=0"], "train.eval_interval", "> 0"),
    (TRAIN, ["eval.tokens=0"], "eval.tokens", "> 0"),
    (TRAIN, ["train.log_interval=-1"], "train.log_interval", "> 0"),
    (TRAIN, ["batch.size=0"], "batch.size", "> 0"),
    (TRAIN, ["model.n_layer=0"], "model.n_layer", "> 0"),
    (TRAIN, ["model.n_embd=0"], "model.n_embd", "> 0"),
    (TRAIN, ["model.n_head=0"], "model.n_head", "> 0"),
    (TRAIN, ["model.n_head=-4"], "model.n_head", "> 0"),
    (TRAIN, ["model.n_head=3"], "model.n_head", "divide"),
    (TRAIN, ["batch=b8", "batch.tokens_per_step=1000"], "batch.tokens_per_step", "multiple"),
    (TRAIN, ["batch.tokens_per_step=-8"], "batch.tokens_per_step", "multiple"),
    (TRAIN, ["optim.warmup_frac=1.5"], "optim.warmup_frac", "[0, 1)"),
    (TRAIN, ["optim.min_lr_frac=2"], "optim.min_lr_frac", "[0, 1]"),
    (TRAIN, ["optim.weight_decay=-0.1"], "optim.weight_decay", ">= 0"),
    (TRAIN, ["data.vocab_size=100000"], "data.vocab_size", "model.vocab_size"),
    (TRAIN, ["model.name=bogus"], "model.name", "gpt2_124m"),
    (TRAIN, ["data.name=web"], "data.name", "synthetic"),
    (TRAIN, ["train.device=tpu"], "train.device", "cuda:N"),
    (TRAIN, ["train.dtype=float16"], "train.dtype", "bfloat16"),
    (TRAIN, ["norm.final=nope"], "norm.final", "layernorm"),
    (TRAIN, ["eval.bln_switches=[TTXF]"], "eval.bln_switches", "TTFF"),
    (TRAIN, ["eval.bln_switches=[TTF]"], "eval.bln_switches", "four letters"),
    (TRAIN, ["data=tokens", "data.path=/nonexistent/shards"], "data.path", "bln-prepare"),
    (TRAIN, ["train.fault=explode@3"], "train.fault", "raise@STEP"),
    (TRAIN, ["train.fault=raise@0"], "train.fault", "raise@STEP"),
    # ---- bln-train: names, paths and stores ----
    (TRAIN, ["tracking.experiment=''"], "tracking.experiment", "non-empty"),
    (TRAIN, ['tracking.experiment="it\'s"'], "tracking.experiment", "quotes"),
    (TRAIN, ["train.out_dir={file}"], "train.out_dir", "is a file"),
    (TRAIN, ["train.out_dir={file}/runs"], "train.out_dir", "is a file"),
    (TRAIN, [f"train.out_dir=/tmp/{'x' * 300}"], "train.out_dir", "File name too long"),
    (TRAIN, ["tracking.uri=file:///tmp/mlruns"], "tracking.uri", "sqlite"),
    (TRAIN, ["tracking.uri=ftp://nowhere/x"], "tracking.uri", "sqlite:///<path>"),
    (TRAIN, ["tracking.uri={garbage_dir}"], "tracking.uri", "directory"),
    (TRAIN, ["tracking.uri=http://127.0.0.1:{deaf}"], "tracking.uri", "does not answer"),
    (TRAIN, [f"tracking.uri=http://u:{PASSWORD}@127.0.0.1:{{deaf}}"], "tracking.uri", "answer"),
    # ---- bln-sweep: grid and search ----
    (SWEEP, ["nrom=layernorm,bln"], "nrom", "norm"),
    (SWEEP, ["norm=layernorm,bogus"], "norm", "layernorm"),
    (SWEEP, [f"norm=layernorm,{LOOKALIKE}"], "norm", "layernorm"),
    (SWEEP, ["seq=glob(nothing*)"], "seq", "empty axis"),
    (SWEEP, ["seed=0,1"], "seed", "search.confirm_seeds"),
    (SWEEP, ["optim.lr=1e-3,2e-3"], "optim.lr", "grid axis"),
    (SWEEP, ["search.n_trials=0"], "search.n_trials", ">= 1"),
    (SWEEP, ["search.confirm_seeds=-1"], "search.confirm_seeds", ">= 0"),
    (SWEEP, ["search.sampler=anneal"], "search.sampler", "tpe"),
    (SWEEP, ["search.pruner=sometimes"], "search.pruner", "median"),
    (SWEEP, ["search.metric=train/loss"], "search.metric", "val/loss"),
    (SWEEP, ["search.n_trails=3"], "search.n_trails", "n_trials"),
    (SWEEP, ["search.params={optim.lr:'interval(3, 1)'}"], "optim.lr", "low < high"),
    (SWEEP, ["search.params={optim.lr:'range(5, 1)'}"], "optim.lr", "start < stop"),
    (SWEEP, ["search.params={optim.lr:'tag(log, interval(0, 1))'}"], "optim.lr", "low > 0"),
    (SWEEP, ["search.params={optim.lr:'choice(1e-3, -5)'}"], "optim.lr", "> 0"),
    (SWEEP, ["search.params={optim.lr:'interval(1e-4, inf)'}"], "optim.lr", "finite"),
    (SWEEP, ["search.params={optim.lrr:'choice(1e-3)'}"], "optim.lrr", "lr"),
    (SWEEP, ["+search.per_norm.bnl={optim.lr: 'choice(1e-3)'}"], "search.per_norm.bnl", "bln"),
    (SWEEP, ["train.fault=oops"], "train.fault", "oom@STEP"),
    (SWEEP, ["model.n_head=0"], "model.n_head", "> 0"),
    (SWEEP, ["optim.lr=inf"], "optim.lr", "finite"),
    # ---- bln-sweep: names, directories, stores ----
    (SWEEP, ["sweep.name=''"], "sweep.name", "non-empty"),
    (SWEEP, ['sweep.name="it\'s"'], "sweep.name", "quotes"),
    (SWEEP, ["sweep.name=a/b"], "sweep.name", "'/'"),
    (SWEEP, ["sweep.name=.."], "sweep.name", "directory name"),
    (SWEEP, ["sweep.name=' edge'"], "sweep.name", "space"),
    (SWEEP, ["sweep.dir={file}"], "sweep.dir", "is a file"),
    (SWEEP, ["sweep.dir={file}/deeper"], "sweep.dir", "is a file"),
    (SWEEP, ["tracking.uri=file:///tmp/mlruns"], "tracking.uri", "sqlite"),
    (SWEEP, ["tracking.uri=http://127.0.0.1:{deaf}"], "tracking.uri", "does not answer"),
    (SWEEP, ["storage=nowhere"], "storage", "embedded"),
    (
        SWEEP,
        ["--dry-run", "storage=postgres", f"storage.url=postgresql://u:{PASSWORD}@127.0.0.1:1/x"],
        "storage.url",
        "cannot connect",
    ),
    # ---- bln-sweep: launchers ----
    (SWEEP, ["launcher=nowhere"], "launcher", "local"),
    (SWEEP, ["launcher.workers=0"], "launcher.workers", ">= 1"),
    (SWEEP, ["launcher.workers=1000000"], "launcher.workers", "<= 256"),
    (SWEEP, ["launcher.timeout_min=0"], "launcher.timeout_min", ">= 1"),
    (SWEEP, ["launcher.workres=3"], "launcher.workres", "workers"),
    (SWEEP, ["launcher=slurm", "launcher.workers=5000"], "launcher.workers", "<= 1000"),
    (SWEEP, ["launcher=slurm", "+launcher.slurm.partiton=x"], "partiton", "partition"),
    (SWEEP, ["launcher=slurm", "launcher.slurm.partiton=x"], "partiton", "partition"),
    (SWEEP, ["launcher=slurm", "launcher.slurm.mem_gb=-1"], "launcher.slurm.mem_gb", "> 0"),
    (SWEEP, ["launcher=slurm", "launcher.slurm.mem=lots"], "launcher.slurm.mem", "16G"),
    (SWEEP, ["launcher=slurm", "+launcher.slurm.time=5"], "launcher.slurm.time", "timeout_min"),
    (SWEEP, ["launcher=slurm", "launcher.slurm.nodes=2"], "launcher.slurm.nodes", "must be 1"),
    (
        SWEEP,
        ["launcher=slurm", "launcher.timeout_min=1", "launcher.slurm.signal_delay_s=120"],
        "launcher.slurm.signal_delay_s",
        "0 < s < 60",
    ),
    (
        SWEEP,
        ["launcher=slurm", "launcher.slurm.array_parallelism=0"],
        "launcher.slurm.array_parallelism",
        ">= 1",
    ),
    (
        SWEEP,
        ["launcher=slurm", "launcher.slurm.mem=16G", "launcher.slurm.mem_gb=16"],
        "launcher.slurm.mem_gb",
        "not both",
    ),
    (
        SWEEP,
        ["launcher=slurm", "launcher.slurm.comment='ok\ntouch pwned #'"],
        "launcher.slurm.comment",
        "control character",
    ),
    (
        SWEEP,
        ["launcher=slurm", "launcher.slurm.partition='gpu\rx'"],
        "launcher.slurm.partition",
        "control character",
    ),
    (
        SWEEP,
        ["launcher=slurm", "launcher.slurm.setup=['module load x', 'a\nb']"],
        "launcher.slurm.setup",
        "control character",
    ),
    (
        SWEEP,
        ["launcher=slurm", "launcher.slurm.additional_parameters={mail-type: 'END\nx'}"],
        "launcher.slurm.additional_parameters.mail-type",
        "control character",
    ),
    (
        SWEEP,
        ["launcher=slurm", "+launcher.slurm.additional_parameters.x_y=1"],
        "launcher.slurm.additional_parameters.x_y",
        "sbatch option name",
    ),
    (
        SWEEP,
        ["launcher=slurm", "launcher.slurm.setup='module load x'"],
        "launcher.slurm.setup",
        "list of strings",
    ),
    # ---- bln-sweep: flags, status, ui ----
    (SWEEP, ["--detatch"], "--detatch", "--detach"),
    (SWEEP, ["status", "nosuch"], "nosuch", "sweeps"),
    (SWEEP, ["status"], "status", "NAME"),
    (SWEEP, ["status", "../x"], "NAME", "'/'"),
    (SWEEP, ["status", "bad"], "bad", "cannot be read", "bad_manifest"),
    (SWEEP, ["status", "bad"], "bad", "cannot be read", "bad_journal"),
    (SWEEP, ["stop", "bad"], "bad", "cannot be read", "bad_manifest"),
    (SWEEP, ["stop", "bad"], "bad", "cannot be read", "bad_journal"),
    (SWEEP, ["ui", "nosuch"], "nosuch", "sweeps"),
    (SWEEP, ["ui", "../x"], "NAME", "'/'"),
    (SWEEP, ["ui", "x", "--port", "abc"], "--port", "not a number"),
    (SWEEP, ["ui", "x", "--port", "70000"], "--port", "1..65535"),
    (SWEEP, ["ui", "x", "--host"], "--host", "needs a value"),
    (SWEEP, ["ui", "x", "--colour"], "--colour", "--port"),
    (SWEEP, ["ui", "x", "y"], "'y'", "one sweep name"),
    (SWEEP, ["ui", "bad", "--host", "no-such-host.invalid"], "--host", "cannot resolve"),
    (SWEEP, ["ui", "bad"], "manifest.json", "not a sweep manifest", "bad_manifest"),
    (SWEEP, ["ui", "bad"], "mlflow.db", "not an SQLite database", "bad_db"),
    # ---- bln-analyze ----
    (ANALYZE, [], "--experiment", "sweeps"),
    (ANALYZE, ["nosuch"], "nosuch", "sweeps"),
    (ANALYZE, ["a", "b"], "unrecognized", "--help"),
    (ANALYZE, ["x", "--format", "pdf"], "pdf", "json"),
    (ANALYZE, ["x", "--format", ""], "--format", "md,csv"),
    (ANALYZE, ["x", "--format", " , "], "--format", "md,csv"),
    (ANALYZE, ["x", "--via", "bogus"], "--via", "client"),
    (ANALYZE, ["x", "--colour"], "--colour", "--help"),
    (ANALYZE, ["x", "--tracking-uri", "file:///tmp/mlruns"], "tracking", "sqlite"),
    (ANALYZE, ["x", "--tracking-uri", "ftp://nowhere"], "tracking", "sqlite"),
    (ANALYZE, ["x", "--tracking-uri", "http://127.0.0.1:{deaf}"], "--tracking-uri", "answer"),
    (ANALYZE, ["x", "--tracking-uri", "http://127.0.0.1:1"], "--tracking-uri", "answer"),
    (ANALYZE, ["x", "--tracking-uri", "sqlite:///{garbage}"], "{garbage}", "cannot be read"),
    (ANALYZE, ["bad"], "manifest.json", "not a sweep manifest", "bad_manifest"),
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
    (
        ANALYZE,
        ["--experiment", "cat", "--tracking-uri", "{store}", "--out", "{file}/tables"],
        "--out",
        "is a file",
    ),
]


def _rows():
    for row in CATALOGUE:
        command, args, key, hint, *setup = row
        yield command, args, key, hint, (setup[0] if setup else None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What the rows point at: a file, a store with four runs, a non-database, a deaf port."""
    from bln_sweeps.tracking import RunLogger

    root = tmp_path_factory.mktemp("world")
    (root / "a-file").write_text("not a directory\n")
    (root / "garbage.db").write_bytes(b"this is not an SQLite database\n" * 64)
    (root / "garbage-dir").mkdir()
    uri = f"sqlite:///{root}/store/mlflow.db"
    for norm in ("layernorm", "rmsnorm"):
        for seed in (0, 1):
            params = {"norm.name": norm, "batch.size": 8, "seq.len": 64, "seed": seed}
            run = RunLogger.start(uri, "cat", params=params, tags={"kind": "single"})
            run.log_metrics({"val/loss": 5.0 + seed / 10, "val/loss@batch": 5.2}, step=10)
            run.end()
    # Listens (connections complete in the kernel's backlog) but never accepts or answers.
    deaf = socket.socket()
    deaf.bind(("127.0.0.1", 0))
    deaf.listen(64)
    values = {
        "{file}": str(root / "a-file"),
        "{garbage}": str(root / "garbage.db"),
        "{garbage_dir}": str(root / "garbage-dir"),
        "{store}": uri,
        "{deaf}": str(deaf.getsockname()[1]),
    }
    yield root, values
    deaf.close()


def damaged_sweep(cwd: Path, kind: str) -> None:
    """sweeps/bad in `cwd` with one file damaged: its manifest, journal or MLflow store."""
    sweep_dir = cwd / "sweeps" / "bad"
    sweep_dir.mkdir(parents=True)
    cell = {"name": "norm=layernorm", "overrides": ["norm=layernorm"], "space": {}}
    manifest = {
        "sweep": "bad",
        "cells": [{**cell, "mlflow_run_id": None}],
        "search": {"n_trials": 1, "confirm_seeds": 0, "metric": "val/loss"},
        "storage_url": None,
        "tracking_uri": f"sqlite:///{sweep_dir / 'mlflow.db'}",
        "mlflow_run_id": None,
        "jobs": [],
    }
    text = json.dumps(manifest)
    (sweep_dir / "manifest.json").write_text(
        text[: len(text) // 2] if kind == "bad_manifest" else text
    )
    (sweep_dir / "optuna.journal").write_text("{not json\n" if kind == "bad_journal" else "")
    (sweep_dir / "mlflow.db").write_bytes(b"garbage\n" * 100)


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under `roots` with its content hash (SQLite's transient -wal/-shm aside)."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm", "-journal"))
    }


def run_in_process(command: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of one command line through its console script's main function."""
    from analysis.cli import main as analyze_main
    from bln_sweeps.cli import train_main
    from launchers.cli import main as sweep_main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [command, *args])
    try:
        if command == TRAIN:
            code = train_main(args)
        elif command == SWEEP:
            sweep_main()
            code = 0
        else:
            analyze_main(args)
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def ids():
    return [
        f"{i:03d} {c} {' '.join(a)} {s or ''}".strip() for i, (c, a, _, _, s) in enumerate(_rows())
    ]


def test_the_catalogue_covers_every_command_and_holds_100_rows():
    rows = list(_rows())
    assert len(rows) >= 100
    assert {cmd for cmd, *_ in rows} == {TRAIN, SWEEP, ANALYZE}
    assert len({(c, tuple(a), s) for c, a, _, _, s in rows}) == len(rows), "a row twice"


@pytest.mark.parametrize("command, args, key, hint, setup", list(_rows()), ids=ids())
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    command, args, key, hint, setup, world, tmp_path, monkeypatch, capsys
):
    root, values = world
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if setup:
        damaged_sweep(cwd, setup)
    for var in ("MLFLOW_TRACKING_URI", "BLN_OPTUNA_URL", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(cwd)

    def fill(text: str) -> str:
        for token, value in values.items():
            text = text.replace(token, value)
        return text

    args, key = [fill(a) for a in args], fill(key)
    before = snapshot(cwd, root)
    code, err = run_in_process(command, args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}:\n{err[-2000:]}"
    assert lines[0].startswith(f"{command}: error:") or lines[0].startswith("bln-sweep ui: error:")
    assert key in lines[0] and hint in lines[0], lines[0]
    assert SECRET not in err, f"a URL password in: {lines[0]}"
    assert snapshot(cwd, root) == before  # nothing created, nothing changed
    assert not (cwd / "sweeps").exists() or setup, "a sweep directory was created"


def test_the_console_scripts_answer_as_the_in_process_rows(tmp_path):
    """The catalogue calls the scripts' main functions; the installed entry points agree."""
    for module, args, key in (
        ("bln_sweeps.cli", ["model.n_head=0"], "model.n_head"),
        ("launchers", ['sweep.name="it\'s"'], "sweep.name"),
        ("analysis", ["x", "--format", ""], "--format"),
    ):
        p = cli(module, *args, cwd=tmp_path, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and key in lines[0], p.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
