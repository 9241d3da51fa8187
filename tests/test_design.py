"""The search design (bln_sweeps.sweep.design): the grammar carries over from Hydra's Optuna
sweeper, start-up trials follow the budget, one sampler stream per cell, fresh confirm seeds, edges
flagged and widened, and held-out evaluation that is the same for every cell and never drifts."""

import json
import math
from contextlib import nullcontext

import optuna
import optuna.distributions as od
import pytest
import torch

from bln_sweeps.config import ConfigError
from bln_sweeps.sweep.design import (
    CellSampler,
    confirm_seed,
    edge_of,
    edge_text,
    edges,
    expression,
    search_seed,
    startup_trials,
    widen,
)
from bln_sweeps.sweep.space import parse_distribution

optuna.logging.set_verbosity(optuna.logging.WARNING)

# ---- the grammar: Hydra's Optuna sweeper's own cases -------------------------------------------

# plugins/hydra_optuna_sweeper/tests/test_optuna_sweeper_plugin.py,
# test_create_optuna_distribution_from_override, with Optuna's current distribution classes
SWEEPER_CASES = [
    ("choice(1,2)", od.CategoricalDistribution([1, 2])),
    ("choice(true, false)", od.CategoricalDistribution([True, False])),
    ("choice('hello', 'world')", od.CategoricalDistribution(["hello", "world"])),
    ("shuffle(range(1,3))", od.CategoricalDistribution((1, 2))),
    ("range(1,3)", od.IntDistribution(1, 3)),
    ("interval(1, 5)", od.FloatDistribution(1, 5)),
    ("int(interval(1, 5))", od.IntDistribution(1, 5)),
    ("tag(log, interval(1, 5))", od.FloatDistribution(1, 5, log=True)),
    ("tag(log, int(interval(1, 5)))", od.IntDistribution(1, 5, log=True)),
    ("range(0.5, 5.5, step=1)", od.FloatDistribution(0.5, 5.5, step=1)),
]


@pytest.mark.parametrize("expression, expected", SWEEPER_CASES)
def test_hydra_optuna_sweeper_grammar_cases_carry_over(expression, expected):
    actual = parse_distribution("key", expression)
    if isinstance(expected, od.CategoricalDistribution):  # shuffle() randomizes the order
        assert isinstance(actual, od.CategoricalDistribution)
        assert set(actual.choices) == set(expected.choices)
    else:
        assert actual == expected


# ---- start-up trials and sampler streams -------------------------------------------------------


@pytest.mark.parametrize(
    "n_trials, expected", [(1, 2), (5, 2), (9, 3), (24, 8), (30, 10), (99, 10)]
)
def test_startup_trials_follow_the_budget(n_trials, expected):
    search = {"n_trials": n_trials, "sampler": "tpe", "seed": 0}
    assert startup_trials(search) == expected
    assert CellSampler("tpe", 0, "c", expected).inner._n_startup_trials == expected
    assert startup_trials({**search, "startup_trials": 7}) == 7  # search.startup_trials wins
    with pytest.raises(ConfigError, match="search.startup_trials"):
        startup_trials({**search, "startup_trials": -1})


def test_tpe_models_the_results_after_the_startup_trials():
    """After its 2 start-up trials the cell's TPE proposes near the best result, where random
    sampling from the same stream does not look."""
    space = {"x": od.FloatDistribution(0.0, 1.0)}

    def values(sampler_name: str) -> list[float]:
        study = optuna.create_study(sampler=CellSampler(sampler_name, 0, "cell", 2))
        xs = []
        for _ in range(12):
            t = study.ask(space)
            study.tell(t, (t.params["x"] - 0.9) ** 2)
            xs.append(t.params["x"])
        return xs

    tpe, rand = values("tpe"), values("random")
    assert tpe[:2] == rand[:2]  # the start-up trials are the stream's random draws
    late = lambda xs: sum(abs(x - 0.9) for x in xs[6:]) / 6  # noqa: E731
    assert late(tpe) < late(rand)


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "gp"])
def test_cells_sample_different_values_and_each_stream_is_stable(sampler):
    space = {"optim.lr": od.FloatDistribution(1e-4, 1e-2, log=True)}

    def first_two(cell: str) -> list[float]:
        study = optuna.create_study(sampler=CellSampler(sampler, 0, cell, 2))
        out = []
        for _ in range(2):
            t = study.ask(space)
            study.tell(t, 1.0)
            out.append(t.params["optim.lr"])
        return out

    a, b = first_two("norm=layernorm,batch=b4"), first_two("norm=bln,batch=b4")
    assert a != b and set(a).isdisjoint(b)
    assert first_two("norm=layernorm,batch=b4") == a  # another worker, a rerun: the same stream


def test_two_workers_of_one_cell_draw_different_trials():
    """Workers share a cell's study: trial numbers differ, so their draws differ."""
    space = {"x": od.FloatDistribution(0.0, 1.0)}
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=storage)
    w1 = optuna.load_study(study_name="s", storage=storage, sampler=CellSampler("tpe", 0, "c", 2))
    w2 = optuna.load_study(study_name="s", storage=storage, sampler=CellSampler("tpe", 0, "c", 2))
    t1, t2 = w1.ask(space), w2.ask(space)  # both running at once
    assert t1.params["x"] != t2.params["x"]


# ---- seeds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [0, 1, 7, 1234])
def test_confirm_seeds_never_include_a_search_seed(base):
    search = {search_seed(base)}
    for k in range(8):
        confirm = {confirm_seed(base, i) for i in range(k)}
        assert len(confirm) == k and not confirm & search


# ---- edges -------------------------------------------------------------------------------------


def test_edges_are_the_outer_tenth_in_log_space_for_log_ranges():
    lr = od.FloatDistribution(1e-4, 1e-2, log=True)  # two decades: a tenth is 10**0.2 = 1.58x
    assert edge_of(lr, 1.5e-4) == "low" and edge_of(lr, 1.7e-4) is None
    assert edge_of(lr, 6.4e-3) == "high" and edge_of(lr, 6.2e-3) is None
    assert edge_of(lr, 1e-3) is None  # the middle of a log range is its geometric mean
    wd = od.FloatDistribution(0.0, 0.2)
    assert edge_of(wd, 0.019) == "low" and edge_of(wd, 0.181) == "high" and not edge_of(wd, 0.1)
    assert edge_of(od.IntDistribution(0, 100), 95) == "high"
    assert edge_of(od.CategoricalDistribution([1, 2]), 2) is None  # no edge to a choice
    found = edges({"optim.lr": lr, "optim.weight_decay": wd}, {"optim.lr": 9e-3, "x": 1})
    assert found == {"optim.lr": "high"} and edge_text(found) == "optim.lr:high"
    assert edge_text({}) == ""


def test_widen_extends_three_fold_past_the_edge():
    lr = od.FloatDistribution(3e-4, 1e-2, log=True)
    assert widen(lr, "high") == od.FloatDistribution(3e-4, 3e-2, log=True)
    assert widen(lr, "low") == od.FloatDistribution(1e-4, 1e-2, log=True)
    assert expression(widen(lr, "high")) == "tag(log, interval(0.0003, 0.03))"
    wd = od.FloatDistribution(0.05, 0.2)
    assert widen(wd, "high") == od.FloatDistribution(0.05, 0.5)
    assert widen(wd, "low") == od.FloatDistribution(0.0, 0.2)  # stays non-negative
    assert widen(od.IntDistribution(10, 20), "high") == od.IntDistribution(10, 40)
    assert expression(widen(od.IntDistribution(10, 20), "high")) == "int(interval(10, 40))"
    # what a search file says, parsed back: the override the sweep prints is valid grammar
    assert parse_distribution("optim.lr", expression(widen(lr, "high"))) == widen(lr, "high")


def worker_for(tmp_path, space: dict, **search):
    """A Worker over a one-cell manifest (no training: the tests drive its study directly)."""
    from bln_sweeps.sweep.space import study_names
    from bln_sweeps.sweep.worker import Worker

    manifest = {
        "sweep": "edge",
        "base_overrides": [],
        "base_seed": 0,
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "storage_url": None,
        "search": {"sampler": "tpe", "seed": 0, "pruner": "none", "pruner_warmup_evals": 1}
        | search,
        "cells": [{"name": "norm=bln", "overrides": ["norm=bln"], "space": space}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    worker = Worker(tmp_path)
    name = study_names("edge", "norm=bln")[0]
    optuna.create_study(study_name=name, storage=worker.storage)
    return worker, manifest["cells"][0], worker.study(name)


def test_expand_edges_widens_once_and_moves_the_best_inside(tmp_path):
    """The loss is best at lr 1.5e-3, beyond the searched range [1e-4, 1e-3]: the best trial sits
    at the high edge; expand_edges widens the range to [1e-4, 3e-3] in the same study, grants
    expand_trials more trials, and the best moves inside."""
    from bln_sweeps.sweep.budget import budget_state

    worker, cell, study = worker_for(
        tmp_path,
        {"optim.lr": "tag(log, interval(1e-4, 1e-3))"},
        n_trials=8,
        expand_edges=True,
        expand_trials=10,
    )

    def loss(lr: float) -> float:
        return (math.log(lr) - math.log(1.5e-3)) ** 2

    def spend_budget() -> None:
        while budget_state(study, worker.search_budget(study))["left"] > 0:
            t = study.ask(worker.cell_space(cell, study))
            study.tell(t, loss(t.params["optim.lr"]))

    spend_budget()
    assert worker.search_budget(study) == 8
    space = worker.cell_space(cell, study)
    assert edges(space, study.best_params) == {"optim.lr": "high"}

    assert worker.maybe_expand(cell, study)
    assert not worker.maybe_expand(cell, study)  # once
    assert worker.search_budget(study) == 18
    wide = worker.cell_space(cell, study)
    assert wide["optim.lr"] == od.FloatDistribution(1e-4, 3e-3, log=True)
    spend_budget()
    assert len(study.trials) == 18
    assert study.best_params["optim.lr"] > 1e-3  # found past the old edge
    assert edges(wide, study.best_params) == {}  # and inside the widened range


def test_expand_edges_leaves_a_cell_without_edges_alone(tmp_path):
    worker, cell, study = worker_for(
        tmp_path, {"optim.lr": "tag(log, interval(1e-4, 1e-2))"}, n_trials=2, expand_edges=True
    )
    for lr in (1e-3, 2e-3):  # both in the middle of the range
        study.enqueue_trial({"optim.lr": lr})
        t = study.ask(worker.cell_space(cell, study))
        study.tell(t, lr)
    assert not worker.maybe_expand(cell, study)
    assert study.user_attrs["expanded"] == {} and worker.search_budget(study) == 2


# ---- held-out evaluation -----------------------------------------------------------------------


def test_test_windows_are_identical_across_batch_sizes_and_disjoint_from_val(make_cfg):
    from bln_sweeps.build import build_model
    from bln_sweeps.data import build_run_data, eval_splits, eval_windows
    from bln_sweeps.evaluate import evaluate

    sets = {}
    for batch in ("b4", "b16"):
        cfg = make_cfg("norm=layernorm", f"batch={batch}", tracking=False)
        splits = eval_splits(build_run_data(cfg).val)
        sets[batch] = {s: eval_windows(t, cfg.seq.len, cfg.eval.tokens) for s, t in splits.items()}
    for split in ("val", "test"):
        x4, y4 = sets["b4"][split]
        x16, y16 = sets["b16"][split]
        assert torch.equal(x4, x16) and torch.equal(y4, y16)
        assert x4.shape == (cfg.eval.tokens // cfg.seq.len, cfg.seq.len)
    # the two splits come from the two halves of the held-out tokens: no shared token position
    val_tokens = build_run_data(cfg).val
    half = len(val_tokens) // 2
    val, test = eval_splits(val_tokens)["val"][0], eval_splits(val_tokens)["test"][0]
    assert len(val) == half and len(val) + len(test) == len(val_tokens)
    assert val.base is val_tokens and test.base is val_tokens  # views of the two halves

    # population statistics: the cell's batch size changes how windows are batched, not the loss
    model = build_model(cfg)
    by_batch = [
        evaluate(model, sets["b4"]["test"], bs, nullcontext, batch_stats=False, split="test")
        for bs in (4, 16)
    ]
    assert by_batch[0]["test/loss"] == pytest.approx(by_batch[1]["test/loss"], abs=1e-6)


def test_runs_log_the_test_split_beside_val(make_cfg):
    from bln_sweeps.train import run

    result = run(make_cfg("norm=bln", "eval.bln_switches=[TTFF]", "train.steps=2", tracking=False))
    for split in ("val", "test"):
        assert {f"{split}/loss", f"{split}/loss@batch", f"{split}/loss@bln-TTFF"} <= set(result)
    assert result["test/loss"] != result["val/loss"]  # different data


def trained_powernorm(make_cfg):
    """A PowerNorm model past its warm-up, with running statistics that moved."""
    from bln_sweeps.build import build_model

    cfg = make_cfg("norm=powernorm", "norm.options.warmup_steps=2", tracking=False)
    model = build_model(cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(5):  # 2 warm-up calls, then 3 that move running_phi
            x = torch.randint(0, cfg.model.vocab_size, (4, 32), generator=g)
            model(x, x)
    assert not any(m.in_warmup for _, m in model.norm_modules())
    return model, g


def test_powernorm_after_warmup_has_batch_gap_exactly_zero(make_cfg):
    """After warm-up PowerNorm's train-mode forward divides by running_phi, as eval does; with
    every batch starting from the same buffers, @batch equals the population loss exactly."""
    from bln_sweeps.evaluate import evaluate

    model, g = trained_powernorm(make_cfg)
    x = torch.randint(0, 512, (12, 32), generator=g)
    out = evaluate(model, (x, x.roll(-1, 1)), 4, nullcontext, batch_stats=True)
    assert out["val/loss@batch"] - out["val/loss"] == 0.0


def test_evaluation_does_not_depend_on_batch_order(make_cfg):
    from bln_sweeps.evaluate import evaluate

    for norm in ("bln", "batchnorm", "powernorm"):
        cfg = make_cfg(f"norm={norm}", tracking=False)
        from bln_sweeps.build import build_model

        model = build_model(cfg)
        model.train()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(3):
                x = torch.randint(0, 512, (4, 32), generator=g)
                model(x, x)
        x = torch.randint(0, 512, (16, 32), generator=g)
        y = x.roll(-1, 1)
        order = torch.tensor([12, 13, 14, 15, 4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11])  # batches
        kw = dict(batch_stats=True, bln_codes=["all"] if norm == "bln" else [])
        forward = evaluate(model, (x, y), 4, nullcontext, **kw)
        shuffled = evaluate(model, (x[order], y[order]), 4, nullcontext, **kw)
        assert forward == shuffled, norm
