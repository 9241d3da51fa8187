"""The compile path (`train.compile=true`): every norm compiles without graph breaks, never
recompiles across steps, and trains as its eager version does.

Tolerance: the compiled and eager paths are different fp32 formulations of the same formulas
(Inductor reorders reductions), so they agree to rounding, not bitwise: 1e-4 relative on module
outputs, gradients and buffers, and 1e-4 on the tiny model's losses after a few AdamW steps.
Compiles are slow on CPU, so the cases are few and small (the tiny model, seq 16)."""

import copy

import pytest
import torch
import torch._dynamo

from bln_sweeps.build import flavour
from bln_sweeps.model import GPT
from bln_sweeps.norms import NORMS, build_norm
from bln_sweeps.train import run

B, T, C = 4, 16, 32
# (label, registry key, options): every registry key, plus the options that change the compiled
# code: PowerNorm crossing its warm-up (warmup_steps=2 -> the switch happens at call 3 below),
# its "running" backward, BLN's other axes and cumavg.
VARIANTS = [
    ("layernorm", "layernorm", {}),
    ("rmsnorm", "rmsnorm", {}),
    ("identity", "identity", {}),
    ("dyt", "dyt", {}),
    ("batchnorm", "batchnorm", {}),
    ("causal_batchnorm", "causal_batchnorm", {}),
    ("bln", "bln", {"batch_size": B, "max_len": T}),
    ("bln_batch_time_cumavg", "bln", {"batch_size": B, "max_len": T, "batch_axes": "batch_time",
                                      "stats": "cumavg"}),
    ("powernorm_warmup", "powernorm", {"groups": 4, "warmup_steps": 2}),
    ("powernorm_running", "powernorm", {"groups": 4, "backward_scale": "running"}),
]  # fmt: skip
IDS = [v[0] for v in VARIANTS]


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def test_every_registry_key_is_covered():
    assert {key for _, key, _ in VARIANTS} == set(NORMS)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("label,key,options", VARIANTS, ids=IDS)
def test_compiled_norm_matches_eager_without_breaks_or_recompiles(label, key, options, masked):
    torch.manual_seed(0)
    eager = build_norm(key, C, **options).train()
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compiled_module = copy.deepcopy(eager)
    # fullgraph: any graph break raises instead of silently splitting the graph
    compiled = torch.compile(compiled_module, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for call in range(4):
        x = torch.randn(B, T, C, generator=g) * 2 + 0.5
        dy = torch.randn(B, T, C, generator=g)
        pad = (torch.rand(B, T, generator=g) < 0.25) if masked else None
        pad = pad if pad is None else pad.index_fill(1, torch.tensor([0]), False)  # n_t > 0
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        # after the first call (the compile) any recompile raises: the warm-up switch and the
        # population updates are tensor ops, not Python branches on buffer values
        stance = "default" if call == 0 else "fail_on_recompile"
        with torch.compiler.set_stance(stance):
            yc = compiled(xc, pad)
        ye = eager(xe, pad)
        if pad is not None:  # pad outputs are arbitrary
            ye, yc = ye.masked_fill(pad[..., None], 0.0), yc.masked_fill(pad[..., None], 0.0)
        ye.backward(dy)
        yc.backward(dy)
        close(yc, ye, f"call {call} output")
        close(xc.grad, xe.grad, f"call {call} input grad")
        for (name, pe), pc in zip(
            eager.named_parameters(), compiled_module.parameters(), strict=True
        ):
            close(pc.grad, pe.grad, f"call {call} {name}.grad")
            pe.grad = pc.grad = None
        for (name, be), bc in zip(eager.named_buffers(), compiled_module.buffers(), strict=True):
            close(bc, be, f"call {call} buffer {name}")


def tiny_gpt(key: str, options: dict) -> GPT:
    torch.manual_seed(0)
    config = flavour("tiny", n_layer=1, block_size=T)
    return GPT(config, lambda site: build_norm(key, config.n_embd, **options))


@pytest.mark.parametrize("label,key,options", VARIANTS, ids=IDS)
def test_model_with_each_norm_has_no_graph_breaks(label, key, options):
    model = tiny_gpt(key, {**options, "max_len": T} if key == "bln" else options).train()
    idx = torch.randint(0, model.config.vocab_size, (B, T))

    def loss_of(idx):
        return model(idx, idx)[1]

    explained = torch._dynamo.explain(loss_of)(idx)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def train_losses(model: GPT, step, steps: int = 4) -> list[float]:
    """AdamW on one fixed batch (so the loss falls); recompiles raise after step 0."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(
        0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(2)
    )
    losses = []
    for i in range(steps):
        with torch.compiler.set_stance("default" if i == 0 else "fail_on_recompile"):
            loss = step(idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # two model compiles, ~40 s on 2 cores
@pytest.mark.parametrize("key,options", [("bln", {"batch_size": B, "max_len": T}),
                                         ("powernorm", {"groups": 4, "warmup_steps": 2})],
                         ids=["bln", "powernorm_warmup"])  # fmt: skip
def test_compiled_model_trains_like_eager(key, options):
    eager = tiny_gpt(key, options)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    eager_losses = train_losses(eager, lambda idx: eager(idx, idx)[1])
    compiled_losses = train_losses(compiled_model, lambda idx: compiled(idx, idx)[1])
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert eager_losses[-1] < eager_losses[0]  # it trained: the comparison is not of constants
    for (name, be), bc in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        close(bc.float(), be.float(), f"buffer {name}")


@pytest.mark.slow  # an eager and a compiled bln-train run, ~60 s on 2 cores
def test_train_compile_runs_on_cpu(make_cfg):
    overrides = ("norm=powernorm", "train.steps=4", "train.eval_interval=4")
    eager = run(make_cfg(*overrides, tracking=False))
    compiled = run(make_cfg(*overrides, "train.compile=true", tracking=False))
    assert compiled["status"] == "finished"
    assert compiled["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-4)
