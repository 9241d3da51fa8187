"""bln-sweep: grid axes x one study per cell, workers that pull trials, pruning, resume."""

import subprocess
import sys
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest

from bln_sweeps.config import ConfigError
from bln_sweeps.sweep.design import confirm_seed
from bln_sweeps.sweep.space import parse_distribution, parse_space
from launchers.plan import make_plan

# A small, fast sweep on the tiny model: 3 norms x 2 batch sizes.
FAST = [
    "train.steps=12",
    "train.eval_interval=4",
    "eval.tokens=512",
    "train.log_interval=4",
    "train.checkpoint_interval=4",
    "batch.tokens_per_step=1024",
    "seq.len=64",
    "data.n_train_tokens=30000",
    "data.n_val_tokens=5000",
]


def test_search_grammar_maps_to_optuna():
    import optuna.distributions as od

    space = parse_space(
        {
            "optim.lr": "tag(log, interval(1e-4, 3e-3))",
            "optim.weight_decay": "interval(0.0, 0.2)",
            "norm.options.warmup_steps": "int(interval(0, 100))",
            "optim.beta2": "choice(0.95, 0.99)",
            "train.steps": "range(1, 9, 2)",
            "seed": 3,
        }
    )
    assert space["optim.lr"] == od.FloatDistribution(1e-4, 3e-3, log=True)
    assert space["optim.weight_decay"] == od.FloatDistribution(0.0, 0.2)
    assert space["norm.options.warmup_steps"] == od.IntDistribution(0, 100)
    assert space["optim.beta2"] == od.CategoricalDistribution([0.95, 0.99])
    assert space["train.steps"] == od.IntDistribution(1, 9, step=2)  # stop included
    assert "seed" not in space  # a plain value is not searched


@pytest.mark.parametrize(
    "expression", ["interval(3, 1)", "tag(log, interval(0, 1))", "range(5, 1)", "interval(a"]
)
def test_invalid_distributions_are_rejected(expression):
    with pytest.raises(ConfigError):
        parse_distribution("optim.lr", expression)


def test_plan_cells_are_the_grid_product():
    plan = make_plan(["norm=layernorm,bln,powernorm", "batch=b4,b16", *FAST])
    assert [c["name"] for c in plan.cells][:2] == [
        "norm=layernorm,batch=b4",
        "norm=layernorm,batch=b16",
    ]
    assert len(plan.cells) == 6 and plan.trial_budget == 6 * (8 + 3)  # conf/sweep.yaml


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["nrom=layernorm,bln"], "nrom"),
        (["norm=layernorm,bogus"], "norm"),
        (["seq=glob(nothing*)"], "seq"),
        (["search.n_trials=0"], "search.n_trials"),
        (["search.confirm_seeds=-1"], "search.confirm_seeds"),
        (["search.startup_trials=-1"], "search.startup_trials"),
        (["search.expand_trials=-1"], "search.expand_trials"),
        (["optim.lr=1e-3,2e-3", "search=default"], "optim.lr"),
        (["search.sampler=anneal"], "search.sampler"),
        (["search.pruner=sometimes"], "search.pruner"),
        (["launcher=nowhere"], "launcher"),
        (["launcher.workers=0"], "launcher.workers"),
    ],
)
def test_bad_sweeps_are_rejected_before_anything_exists(overrides, key, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "launchers", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], p.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_searched_key_that_is_a_grid_axis_is_rejected():
    with pytest.raises(ConfigError, match="grid axis"):
        make_plan(["optim.lr=1e-3,2e-3"])


def test_unreachable_storage_is_rejected():
    with pytest.raises(ConfigError, match="storage.url"):
        from launchers.prepare import check_storage

        check_storage("postgresql://nobody@127.0.0.1:1/none")


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "launchers", "--dry-run", "norm=layernorm,bln", "batch=b4,b16"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "4 cells" in p.stdout and "norm=bln,batch=b16" in p.stdout
    assert list(tmp_path.iterdir()) == []


# ---- end to end: real worker processes, a real journal file, a real MLflow SQLite store ------


def bln_sweep(*args, cwd, timeout=900, **kw):
    return subprocess.run(
        [sys.executable, "-m", "launchers", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def sweep_facts(sweep_dir: Path) -> dict:
    """Trial counts per cell from the studies, and every MLflow run of the sweep."""
    import optuna
    from mlflow.tracking import MlflowClient

    from bln_sweeps.sweep.budget import counted
    from bln_sweeps.sweep.manifest import load_manifest
    from bln_sweeps.sweep.space import open_storage, study_names

    m = load_manifest(sweep_dir)
    storage = open_storage(m["storage_url"], sweep_dir)
    facts = {"cells": {}, "runs": []}
    for cell in m["cells"]:
        search, confirm = (
            optuna.load_study(study_name=n, storage=storage)
            for n in study_names(m["sweep"], cell["name"])
        )
        facts["cells"][cell["name"]] = {
            "search": [t for t in search.get_trials() if counted(t)],
            "confirm": [t for t in confirm.get_trials() if counted(t)],
        }
    client = MlflowClient(tracking_uri=m["tracking_uri"])
    exp = client.get_experiment_by_name(m["sweep"])
    facts["runs"] = client.search_runs([exp.experiment_id], max_results=5000)
    return facts


def assert_complete(facts, n_trials, confirm_seeds):
    for name, cell in facts["cells"].items():
        search = cell["search"]
        assert len(search) == n_trials, name
        assert all(t.state.is_finished() for t in search), name
        assert len({t.number for t in search}) == n_trials  # no duplicate trial numbers
        confirm = sorted(t.user_attrs["seed"] for t in cell["confirm"])
        assert confirm == [confirm_seed(0, i) for i in range(confirm_seeds)]  # 1..k
        assert not set(confirm) & {t.user_attrs["seed"] for t in search}  # fresh seeds
    assert not [r for r in facts["runs"] if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_sweep_end_to_end_with_local_workers(tmp_path):
    p = bln_sweep(
        "norm=layernorm,bln,powernorm",
        "batch=b4,b16",
        "sweep.name=e2e",
        "search.n_trials=3",
        "search.confirm_seeds=2",
        "launcher.workers=2",
        "search.pruner=none",
        *FAST,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    facts = sweep_facts(tmp_path / "sweeps" / "e2e")
    assert len(facts["cells"]) == 6
    assert_complete(facts, n_trials=3, confirm_seeds=2)
    kinds = [r.data.tags["kind"] for r in facts["runs"]]
    assert kinds.count("sweep") == 1 and kinds.count("cell") == 6
    assert kinds.count("trial") == 18 and kinds.count("confirm") == 12
    trial = next(r for r in facts["runs"] if r.data.tags["kind"] == "confirm")
    assert trial.data.tags["sweep"] == "e2e" and "mlflow.parentRunId" in trial.data.tags
    assert " · confirm seed " in trial.info.run_name
    # confirm runs re-run the best trial's parameters
    for cell in facts["cells"].values():
        best = min((t for t in cell["search"] if t.value is not None), key=lambda t: t.value)
        assert all(t.user_attrs["best_trial"] == best.number for t in cell["confirm"])
    # a rerun of the same command resumes: nothing left, nothing run twice
    again = bln_sweep(
        "norm=layernorm,bln,powernorm",
        "batch=b4,b16",
        "sweep.name=e2e",
        "search.n_trials=3",
        "search.confirm_seeds=2",
        "launcher.workers=2",
        "search.pruner=none",
        *FAST,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert len(sweep_facts(tmp_path / "sweeps" / "e2e")["runs"]) == len(facts["runs"])


@pytest.mark.slow
def test_pruning_stops_hopeless_trials(tmp_path):
    p = bln_sweep(
        "norm=layernorm",
        "sweep.grid={batch: b4}",  # one cell
        "sweep.name=prune",
        "search.n_trials=6",
        "search.confirm_seeds=0",
        "search.sampler=random",
        # the cell's random stream is fixed by search.seed (bln_sweeps.sweep.design): seed 1 draws
        # 3e-3, 3e-3, then 1e-7, so the median pruner has two good curves to stop it against
        "search.seed=1",
        "search.pruner=median",
        "launcher=debug",
        "search.params={optim.lr:'choice(3e-3, 1e-7)'}",
        *FAST,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    cell = sweep_facts(tmp_path / "sweeps" / "prune")["cells"]["batch=b4"]
    states = [t.state.name for t in cell["search"]]
    assert states.count("PRUNED") >= 1 and len(states) == 6
    pruned = [t for t in cell["search"] if t.state.name == "PRUNED"]
    assert all(t.params["optim.lr"] == 1e-7 for t in pruned)


@pytest.mark.slow
def test_killed_worker_trial_is_retried_from_its_checkpoint(tmp_path):
    import os
    import signal
    import time

    args = [
        "norm=layernorm",
        "sweep.grid={batch: b4}",  # one cell
        "sweep.name=kill",
        "search.n_trials=2",
        "search.confirm_seeds=1",
        "launcher.workers=1",
        "search.pruner=none",
        *[o for o in FAST if o.split("=")[0] not in ("train.steps", "train.eval_interval")],
        "train.steps=150",  # long enough (seconds) to be caught between checkpoints
        "train.eval_interval=50",
    ]
    p = bln_sweep(*args, "--detach", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    sweep_dir = tmp_path / "sweeps" / "kill"
    from bln_sweeps.sweep.manifest import load_manifest
    from bln_sweeps.sweep.space import open_storage

    m = load_manifest(sweep_dir)
    storage = open_storage(m["storage_url"], sweep_dir)
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline:  # a trial that has checkpointed
        for study in storage.get_all_studies():
            for t in storage.get_all_trials(study._study_id, deepcopy=False):
                ckpt = Path(t.user_attrs.get("run_dir", "/nonexistent")) / "ckpt.pt"
                if t.state.name == "RUNNING" and ckpt.exists():
                    victim = t
        time.sleep(0.05)
    assert victim is not None
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)  # the worker dies mid-trial
    p = bln_sweep(*args, cwd=tmp_path)  # the same command again
    assert p.returncode == 0, p.stdout + p.stderr
    facts = sweep_facts(sweep_dir)
    assert_complete(facts, n_trials=2, confirm_seeds=1)
    retried = [
        t
        for c in facts["cells"].values()
        for t in c["search"] + c["confirm"]
        if t.user_attrs.get("retry_of") == victim.number
    ]
    assert len(retried) == 1 and retried[0].user_attrs["run_dir"] == victim.user_attrs["run_dir"]
    # the retry resumed the dead trial's MLflow run from its checkpoint
    run = next(r for r in facts["runs"] if r.info.run_id == retried[0].user_attrs["mlflow_run_id"])
    assert int(run.data.tags["resumed_from_step"]) >= 4


def test_jobs_run_the_code_snapshot_taken_at_submit(tmp_path):
    """Edits to the checkout after submit never reach queued jobs: a job started with
    `job_env` imports the snapshot even from the checkout's own directory, and its runs carry
    the checkout's SHA."""
    import json
    import os

    from launchers import snapshot

    snap = snapshot.take(tmp_path)
    assert snap.parent == tmp_path.resolve() / "code"
    assert {p.name for p in snap.iterdir()} >= {"bln_sweeps", "launchers", "analysis", "conf"}
    version = json.loads((snap / "CODE_VERSION.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert version["git.sha"] == head.stdout.strip()
    # an "edit" that exists only in the snapshot: the job must see it, i.e. import the snapshot
    (snap / "bln_sweeps" / "marker.py").write_text("WHERE = 'snapshot'\n")
    probe = (
        "import bln_sweeps, bln_sweeps.marker as m;"
        "from bln_sweeps.tracking.provenance import _git_tags;"
        "from bln_sweeps.config import CONF_DIR; import json;"
        "print(json.dumps([bln_sweeps.__file__, m.WHERE, str(CONF_DIR), _git_tags()]))"
    )
    env = {**os.environ, **snapshot.job_env(snap)}
    root = snapshot.source_root()
    # from the checkout itself, where `-c`/`-m` would otherwise put the live tree first
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True)
    assert out.returncode == 0, out.stderr
    where, marker, conf, tags = json.loads(out.stdout)
    assert where.startswith(str(snap)) and marker == "snapshot"
    assert conf == str(snap / "conf")
    assert tags["code.snapshot"] == str(snap) and tags["git.sha"] == version["git.sha"]


@pytest.mark.slow
def test_sweep_on_postgresql_storage(tmp_path, postgres_url):
    """storage=postgres: the studies live in a real PostgreSQL, two workers share them."""
    import psycopg

    p = bln_sweep(
        "norm=layernorm,rmsnorm",
        "sweep.name=pg",
        "search.n_trials=2",
        "search.confirm_seeds=1",
        "launcher.workers=2",
        "storage=postgres",
        f"storage.url={postgres_url}",
        *FAST,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    facts = sweep_facts(tmp_path / "sweeps" / "pg")
    assert_complete(facts, n_trials=2, confirm_seeds=1)
    assert not (tmp_path / "sweeps" / "pg" / "optuna.journal").exists()
    with psycopg.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT study_name FROM studies ORDER BY study_name")
        names = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")
        (complete,) = cur.fetchone()
    assert names == [
        "pg/norm=layernorm",
        "pg/norm=layernorm/confirm",
        "pg/norm=rmsnorm",
        "pg/norm=rmsnorm/confirm",
    ]
    assert complete == 2 * (2 + 1)


@pytest.mark.parametrize(
    "params",
    [
        {"optim.lr": 0.00123, "optim.weight_decay": 0.05},
        {"norm.options.warmup_steps": 7, "train.steps": 3},  # an option of one norm
        {"batch": "b16", "optim.lr": 0.002},  # a config group: the full compose
    ],
)
def test_trial_config_equals_composing_the_trial_overrides(tmp_path, params):
    """Workers compose a cell once and set sampled values on a copy: the result must be exactly
    what Hydra composes from the trial's overrides."""
    from bln_sweeps.compose import compose
    from bln_sweeps.config import to_run_config, validate
    from bln_sweeps.sweep.trial_config import trial_overrides
    from bln_sweeps.sweep.worker import Worker

    manifest = {
        "sweep": "eq",
        "base_overrides": ["norm=powernorm", *FAST],
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "storage_url": None,
        "search": {},
        "cells": [{"name": "batch=b4", "overrides": ["batch=b4"]}],
    }
    (tmp_path / "manifest.json").write_text(__import__("json").dumps(manifest))
    worker = Worker(tmp_path)
    cell = manifest["cells"][0]
    expected = validate(to_run_config(compose(trial_overrides(manifest, cell, params, 3), "sweep")))
    assert worker.trial_config(cell, params, 3) == expected
    assert worker.trial_config(cell, {}, 3) != expected  # the cached tree was not modified


EDGE_SPACE = "++search.params={train.steps: 'int(interval(11, 12))', optim.lr: 'choice(3e-3)'}"


@pytest.mark.slow
def test_sweep_flags_a_best_value_at_an_edge(tmp_path):
    """Every value of a two-point range lies at an edge: the sweep's last lines name the cell,
    the key and the edge, with the override that widens it, and the table carries at_edge."""
    p = bln_sweep(
        "norm=layernorm",
        "sweep.grid={batch: b4}",  # one cell
        "sweep.name=edge",
        "search.n_trials=2",
        "search.confirm_seeds=2",
        "search.pruner=none",
        EDGE_SPACE,
        *FAST,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    cell = sweep_facts(tmp_path / "sweeps" / "edge")["cells"]["batch=b4"]
    best = min((t for t in cell["search"] if t.value is not None), key=lambda t: t.value)
    steps = best.params["train.steps"]
    edge = {11: "low", 12: "high"}[steps]
    tail = p.stdout.split("browse the runs")[0]
    line = next(x for x in tail.splitlines() if x.startswith("at edge: batch=b4: "))
    assert f"train.steps={steps} lies in the {edge} tenth of int(interval(11, 12))" in line
    wider = "int(interval(11, 14))" if edge == "high" else "int(interval(9, 12))"
    assert f"\"search.params={{train.steps: '{wider}'}}\"" in line

    table = subprocess.run(
        [sys.executable, "-m", "analysis", "edge", "--format", "csv", "--baseline", "none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert table.returncode == 0, table.stderr
    row = pd.read_csv(StringIO(table.stdout), keep_default_na=False).iloc[0]
    assert row["at_edge"] == f"train.steps:{edge}"
    assert row["n_seeds"] == 2


@pytest.mark.slow
def test_expand_edges_widens_the_range_in_the_same_study(tmp_path):
    """search.expand_edges: a cell whose best is at an edge gets expand_trials more trials, asked
    with the widened range, in the same study; once."""
    import optuna.distributions as od

    p = bln_sweep(
        "norm=layernorm",
        "sweep.grid={batch: b4}",
        "sweep.name=expand",
        "search.n_trials=2",
        "search.confirm_seeds=0",
        "search.pruner=none",
        "search.expand_edges=true",
        "search.expand_trials=2",
        EDGE_SPACE,
        *FAST,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    trials = sweep_facts(tmp_path / "sweeps" / "expand")["cells"]["batch=b4"]["search"]
    assert len(trials) == 2 + 2
    first = {t.distributions["train.steps"] for t in trials[:2]}
    later = {t.distributions["train.steps"] for t in trials[2:]}
    assert first == {od.IntDistribution(11, 12)}
    assert later in ({od.IntDistribution(11, 14)}, {od.IntDistribution(9, 12)})


@pytest.mark.slow
def test_sweep_over_dyt_and_qk_norm_end_to_end(tmp_path):
    """The reviewer's controls as grid axes: norm=layernorm,dyt,bln x model.qk_norm=none,rmsnorm,
    six cells, every training run probed for leaks, and the table splits cells by both axes."""
    from analysis import comparison_table, load_runs
    from bln_sweeps.sweep.manifest import load_manifest

    p = bln_sweep(
        "norm=layernorm,dyt,bln",
        "model.qk_norm=none,rmsnorm",
        "sweep.name=controls",
        "search.n_trials=1",
        "search.confirm_seeds=1",
        "launcher=debug",
        "search.pruner=none",
        *FAST,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    facts = sweep_facts(tmp_path / "sweeps" / "controls")
    assert len(facts["cells"]) == 6
    assert_complete(facts, n_trials=1, confirm_seeds=1)
    training = [r for r in facts["runs"] if r.data.tags["kind"] in ("trial", "confirm")]
    assert len(training) == 12
    for r in training:
        assert r.data.tags["leak.measured"] == r.data.tags["leaky"] == "false"
        assert r.data.tags["leak.mismatch"] == "false" and r.data.tags["leak.probes"] == "0"
    cells = {(r.data.params["norm.name"], r.data.params["model.qk_norm"]) for r in training}
    assert cells == {(n, q) for n in ("layernorm", "dyt", "bln") for q in ("none", "rmsnorm")}

    uri = load_manifest(tmp_path / "sweeps" / "controls")["tracking_uri"]
    table = comparison_table(load_runs("controls", uri))
    assert {"norm.name", "model.qk_norm"} <= set(table.attrs["axes"])
    assert len(table) == 6 and not table["leaky"].any()
