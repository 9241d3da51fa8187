"""GPT-2 with every norm variant: sizes, the causality matrix of NORMS.md §8.4, eval-mode batch
independence, state round trips, bf16, batch size one."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from bln_sweeps.build import flavour
from bln_sweeps.evaluate import bln_switches, frozen_buffers
from bln_sweeps.model import GPT, GPTConfig
from bln_sweeps.norms import NORMS, build_norm

T, B, K = 12, 4, (1, 6, 11)  # sequence length, batch, perturbed positions (1, T/2, T-1)
SMALL = GPTConfig(block_size=T, vocab_size=64, n_layer=2, n_head=4, n_embd=32)

# (label, norm key, options). PowerNorm with warm-up 1000 is still in warm-up; with 0 it is past.
VARIANTS = [
    ("layernorm", "layernorm", {}),
    ("rmsnorm", "rmsnorm", {}),
    ("identity", "identity", {}),
    ("dyt", "dyt", {}),
    ("batchnorm", "batchnorm", {}),
    ("causal_batchnorm", "causal_batchnorm", {}),
    ("bln", "bln", {"batch_size": B, "max_len": T}),
    ("bln_batch_time", "bln", {"batch_size": B, "max_len": T, "batch_axes": "batch_time"}),
    ("powernorm_warmup", "powernorm", {"groups": 4, "warmup_steps": 1000}),
    ("powernorm", "powernorm", {"groups": 4, "warmup_steps": 0}),
]

# (own positions < k, other sequences at positions < k, other sequences anywhere) change in TRAIN
# mode when token (0, k) changes. NORMS.md §8.4, plus our causal BatchNorm (§8.5).
EXPECTED_TRAIN = {
    "layernorm": (False, False, False),
    "rmsnorm": (False, False, False),
    "identity": (False, False, False),
    "dyt": (False, False, False),
    "batchnorm": (True, True, True),
    "causal_batchnorm": (False, False, True),
    "bln": (False, False, True),
    "bln_batch_time": (True, True, True),
    "powernorm_warmup": (True, True, True),
    "powernorm": (False, False, False),
}


def make_model(key, options, seed=0, config=SMALL, **switches):
    config = replace(config, **switches)  # qk_norm, norm_placement
    torch.manual_seed(seed)
    return GPT(config, lambda site: build_norm(key, config.n_embd, **options))


def warm_up(model, steps=3, batch=B):
    """A few train-mode forwards so running statistics are not at their initial values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.train()
        for _ in range(steps):
            model(torch.randint(0, SMALL.vocab_size, (batch, T), generator=g))


def idx_batch(seed=2):
    return torch.randint(0, SMALL.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def observe_leaks(model, train: bool, k: int):
    idx = idx_batch()
    perturbed = idx.clone()
    perturbed[0, k] = (idx[0, k] + 1) % SMALL.vocab_size
    with frozen_buffers(model), torch.no_grad():
        model.train(train)
        a, _ = model(idx)
    with frozen_buffers(model), torch.no_grad():
        model.train(train)
        b, _ = model(perturbed)
    d = (a - b).abs()
    tol = 1e-7
    return (bool(d[0, :k].max() > tol), bool(d[1:, :k].max() > tol), bool(d[1:].max() > tol))


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_causality_matrix(label, key, options):
    model = make_model(key, options)
    warm_up(model, steps=2)
    for k in K:
        assert observe_leaks(model, train=True, k=k) == EXPECTED_TRAIN[label], (label, k)
        assert observe_leaks(model, train=False, k=k) == (False, False, False), (label, k)
    # the declaration every module makes agrees with what the probe observed
    causal = not any(EXPECTED_TRAIN[label][:2])
    for _, norm in model.norm_modules():
        assert norm.causal_in_train == causal, label


def test_bln_eval_with_batch_statistics_is_cross_sequence_but_causal():
    model = make_model("bln", {"batch_size": B, "max_len": T})
    warm_up(model)
    with bln_switches(model, "FFFF"):
        for k in K:
            assert observe_leaks(model, train=False, k=k) == (False, False, True)


def test_contiguous_rows_leak_the_last_target_through_bln():
    """NORMS.md §8.3: with DataLoaderLite-style rows (row b+1 continues row b), the target of
    (b, T-1) is x[b+1, 0], and per-position batch statistics carry it back to row b."""
    model = make_model("bln", {"batch_size": B, "max_len": T})
    idx = idx_batch()
    perturbed = idx.clone()
    perturbed[1, 0] = (idx[1, 0] + 1) % SMALL.vocab_size
    with frozen_buffers(model), torch.no_grad():
        model.train()
        a, _ = model(idx)
        b, _ = model(perturbed)
    assert (a[0, T - 1] - b[0, T - 1]).abs().max() > 1e-6


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_eval_is_batch_independent(label, key, options):
    model = make_model(key, options)
    warm_up(model)
    model.eval()
    idx = idx_batch()
    with torch.no_grad():
        alone, _ = model(idx[:1])
        inside, _ = model(idx)
    torch.testing.assert_close(alone[0], inside[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_state_dict_round_trip_reproduces_eval_logits(label, key, options):
    model = make_model(key, options)
    warm_up(model)
    clone = make_model(key, options, seed=123)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(idx_batch())[0], clone(idx_batch())[0])


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_bf16_autocast_is_finite(label, key, options):
    model = make_model(key, options)
    idx = idx_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_batch_of_one_trains_and_stays_finite(label, key, options):
    options = {**options, "batch_size": 1} if key == "bln" else options
    model = make_model(key, options)
    idx = idx_batch()[:1]
    model.train()
    _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(idx)[0]).all()
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())


def test_gpt2_124m_parameter_count_and_norm_sites():
    model = GPT(flavour("gpt2_124m", block_size=1024))  # block_size 1024, vocab 50257, biases
    assert model.num_params() == 124_439_808
    assert len(model.norm_modules()) == 25
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize(
    "key, norm_params", [("rmsnorm", 19_200), ("identity", 0), ("bln", 38_400)]
)
def test_gpt2_124m_parameter_count_per_norm(key, norm_params):
    options = {"batch_size": 8} if key == "bln" else {}
    cfg = flavour("gpt2_124m", block_size=1024)
    with torch.device("meta"):  # sizes only; no 124M init on CPU
        model = GPT(cfg, lambda site: build_norm(key, cfg.n_embd, **options))
    assert model.num_params() == 124_439_808 - 38_400 + norm_params


def test_norm_chosen_per_site():
    def factory(site):
        return build_norm("layernorm" if site == "ln_f" else "rmsnorm", SMALL.n_embd)

    model = GPT(SMALL, factory)
    kinds = {name.rsplit(".", 1)[-1]: type(m).__name__ for name, m in model.norm_modules()}
    assert kinds["ln_f"] == type(build_norm("layernorm", 8)).__name__
    assert kinds["ln_1"] == kinds["ln_2"] == type(build_norm("rmsnorm", 8)).__name__


def test_initial_loss_is_about_ln_vocab():
    model = make_model("layernorm", {})
    idx = idx_batch()
    _, loss = model(idx, idx.roll(-1, 1))
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.3


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        make_model("layernorm", {})(torch.zeros(1, T + 1, dtype=torch.long))


def test_no_weight_decay_on_norm_parameters():
    for key, opts in [("layernorm", {}), ("bln", {"batch_size": B, "max_len": T})]:
        model = make_model(key, opts)
        decay, no_decay = model.optimizer_groups(0.1)
        norm_params = {id(p) for _, m in model.norm_modules() for p in m.parameters()}
        assert norm_params <= {id(p) for p in no_decay["params"]}
        assert not norm_params & {id(p) for p in decay["params"]}
        every = {id(p) for p in model.parameters()}
        assert every == {id(p) for g in (decay, no_decay) for p in g["params"]}


def test_registry_keys_equal_norm_yaml_stems():
    from bln_sweeps.config import group_options

    assert sorted(NORMS) == group_options("norm")


# -----------------------------------------------------------------------------
# the reviewer's controls: QK-norm and Peri-LN placement combine with every norm

SWITCHES = [(qk, pl) for qk in ("none", "rmsnorm", "layernorm") for pl in ("pre", "peri")]


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("qk_norm, placement", SWITCHES, ids=[f"{q}-{p}" for q, p in SWITCHES])
def test_causality_matrix_holds_with_qk_norm_and_placement(label, key, options, qk_norm, placement):
    model = make_model(key, options, qk_norm=qk_norm, norm_placement=placement)
    warm_up(model, steps=2)
    k = K[1]
    assert observe_leaks(model, train=True, k=k) == EXPECTED_TRAIN[label], (label, k)
    assert observe_leaks(model, train=False, k=k) == (False, False, False), (label, k)
    idx = idx_batch()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # q, k, v reach SDPA in one dtype
        _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("qk_norm", ["rmsnorm", "layernorm"])
def test_qk_norm_normalises_q_and_k_per_head_with_a_head_dim_gain(qk_norm):
    model = make_model("layernorm", {}, qk_norm=qk_norm)
    attn = model.transformer.h[0].attn
    hs = SMALL.n_embd // SMALL.n_head
    with torch.no_grad():  # non-trivial gains, different for q and k
        attn.q_norm.weight.copy_(torch.linspace(0.5, 1.5, hs))
        attn.k_norm.weight.copy_(torch.linspace(2.0, 0.2, hs))
    assert attn.q_norm.weight.shape == (hs,) and getattr(attn.q_norm, "bias", None) is None
    x = torch.randn(B, T, SMALL.n_embd, generator=torch.Generator().manual_seed(3))

    def norm(u, gain):  # (B, nh, T, hs) over hs
        if qk_norm == "rmsnorm":
            return u / torch.sqrt(u.square().mean(-1, keepdim=True) + 1e-5) * gain
        return F.layer_norm(u, (hs,), gain, None, 1e-5)

    q, k, v = attn.c_attn(x).split(SMALL.n_embd, dim=2)
    q, k, v = (u.view(B, T, SMALL.n_head, hs).transpose(1, 2) for u in (q, k, v))
    q, k = norm(q, attn.q_norm.weight), norm(k, attn.k_norm.weight)
    att = (q @ k.transpose(-2, -1)) / hs**0.5  # (B, nh, T, T)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, SMALL.n_embd)
    torch.testing.assert_close(attn(x), attn.c_proj(y), rtol=0, atol=1e-5)
    # what QK-norm is for: scaling the q and k projections no longer scales the attention logits
    before = attn(x)
    with torch.no_grad():
        attn.c_attn.weight[: 2 * SMALL.n_embd].mul_(10.0)
        attn.c_attn.bias[: 2 * SMALL.n_embd].mul_(10.0)
    torch.testing.assert_close(attn(x), before, rtol=0, atol=1e-4)


def test_peri_block_normalises_each_sublayer_output():
    model = make_model("rmsnorm", {}, norm_placement="peri")
    block = model.transformer.h[0]
    with torch.no_grad():  # distinguishable gains per site
        for i, site in enumerate(("ln_1", "ln_2", "ln_1_out", "ln_2_out")):
            getattr(block, site).weight.fill_(0.5 + i)
    x = torch.randn(B, T, SMALL.n_embd, generator=torch.Generator().manual_seed(4))
    h = x + block.ln_1_out(block.attn(block.ln_1(x)))
    expected = h + block.ln_2_out(block.mlp(block.ln_2(h)))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert len(model.norm_modules()) == 4 * SMALL.n_layer + 1
    pre = make_model("rmsnorm", {})
    assert not hasattr(pre.transformer.h[0], "ln_1_out")  # GPT-2's state_dict keys stay as they are


# gpt2_124m at block_size 1024: parameters per norm, placement and QK-norm (README table)
PARAM_COUNTS = [
    ("layernorm", "pre", "none", 124_439_808),
    ("layernorm", "peri", "none", 124_476_672),
    ("layernorm", "pre", "rmsnorm", 124_441_344),
    ("layernorm", "peri", "layernorm", 124_478_208),
    ("rmsnorm", "peri", "none", 124_439_808 - 38_400 + 37_632),
    ("dyt", "pre", "none", 124_439_808 + 25),
    ("dyt", "peri", "none", 124_476_672 + 49),
    ("bln", "peri", "none", 124_476_672),
]


@pytest.mark.parametrize("key, placement, qk_norm, expected", PARAM_COUNTS)
def test_gpt2_124m_parameter_count_per_placement(key, placement, qk_norm, expected):
    options = {"batch_size": 8} if key == "bln" else {}
    cfg = flavour("gpt2_124m", block_size=1024, norm_placement=placement, qk_norm=qk_norm)
    with torch.device("meta"):  # sizes only
        model = GPT(cfg, lambda site: build_norm(key, cfg.n_embd, **options))
    assert model.num_params() == expected


@pytest.mark.parametrize("qk_norm", ["rmsnorm", "layernorm"])
def test_qk_norm_and_peri_trace_as_one_graph(qk_norm):
    """torch.compile (train.compile) sees the whole model, QK-norm and Peri-LN included, as one
    graph with no break, and the compiled forward and backward equal eager (AOT autograd; the
    inductor code generation is the slow test below). Not bitwise: under compile the norms run
    their plain-op formulation (norms/), eager their hand-written autograd Functions, which
    round differently in the last bits (~1e-7 here)."""
    check_compiled(qk_norm, backend="aot_eager", atol=1e-6)


@pytest.mark.slow
def test_qk_norm_compiles_with_inductor_on_cpu():
    check_compiled("rmsnorm", backend="inductor", atol=1e-5)


def check_compiled(qk_norm, backend, atol):
    tiny = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)
    model = make_model("layernorm", {}, config=tiny, qk_norm=qk_norm, norm_placement="peri")
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    logits, loss = compiled(idx, idx.roll(-1, 1))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_logits, ref_loss = model(idx, idx.roll(-1, 1))
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=atol)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=max(atol, 1e-6) * 10)


def test_dyt_alpha_init_per_site_from_the_config(make_cfg):
    from bln_sweeps.build import build_model

    cfg = make_cfg(
        "norm=dyt",
        "norm.options.alpha_init=0.3",
        "norm.sites.ln_1.alpha_init=0.8",
        "norm.sites.ln_2.alpha_init=0.2",
        "model.norm_placement=peri",
        tracking=False,
    )
    model = build_model(cfg)
    alphas = {name.split(".")[-1]: round(m.alpha.item(), 6) for name, m in model.norm_modules()}
    # ln_f and the Peri-LN output norms take options.alpha_init unless a site says otherwise
    assert alphas == {"ln_1": 0.8, "ln_2": 0.2, "ln_1_out": 0.3, "ln_2_out": 0.3, "ln_f": 0.3}


def test_a_site_may_use_another_variant(make_cfg):
    from bln_sweeps.build import build_model

    cfg = make_cfg(
        "norm=bln", "model.norm_placement=peri", "+norm.sites.ln_2_out.name=rmsnorm", tracking=False
    )
    kinds = {n.split(".")[-1]: type(m).__name__ for n, m in build_model(cfg).norm_modules()}
    assert kinds == {
        "ln_1": "BatchLayerNorm",
        "ln_2": "BatchLayerNorm",
        "ln_1_out": "BatchLayerNorm",
        "ln_2_out": "RMSNorm",
        "ln_f": "BatchLayerNorm",
    }


def test_dyt_saturation_is_reported_per_site_kind():
    from contextlib import nullcontext

    from bln_sweeps.evaluate import evaluate

    model = make_model("dyt", {}, norm_placement="peri")
    x, y = idx_batch(), idx_batch(seed=3)  # one batch of windows, (B, T) each
    with torch.no_grad():
        for name, m in model.norm_modules():
            m.alpha.fill_({"ln_2": 1e3, "ln_1": 1e-6}.get(name.rsplit(".", 1)[-1], 60.0))
    seen = []  # the ln_f input, to count by hand
    model.transformer.ln_f.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = evaluate(model, (x, y), x.shape[0], nullcontext, batch_stats=False)
    kinds = ("ln_1", "ln_1_out", "ln_2", "ln_2_out", "ln_f")
    assert [k for k in out if k.startswith("dyt/")] == [f"dyt/saturated@{k}" for k in kinds]
    assert out["dyt/saturated@ln_2"] > 0.9 and out["dyt/saturated@ln_1"] == 0.0
    expected = ((60.0 * seen[0]).abs() > 2).float().mean().item()
    assert 0 < expected < 1 and out["dyt/saturated@ln_f"] == pytest.approx(expected)
    plain = evaluate(make_model("layernorm", {}), (x, y), len(x), nullcontext, batch_stats=False)
    assert not [k for k in plain if k.startswith("dyt/")]
