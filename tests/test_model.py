"""GPT-2 with every norm variant: sizes, the causality matrix of NORMS.md §8.4, eval-mode batch
independence, state round trips, bf16, batch size one."""

import pytest
import torch

from bln_sweeps.evaluate import bln_switches, frozen_buffers
from bln_sweeps.model import GPT, GPTConfig, gpt_config
from bln_sweeps.norms import NORMS, build_norm

T, B, K = 12, 4, (1, 6, 11)  # sequence length, batch, perturbed positions (1, T/2, T-1)
SMALL = GPTConfig(block_size=T, vocab_size=64, n_layer=2, n_head=4, n_embd=32)

# (label, norm key, options). PowerNorm with warm-up 1000 is still in warm-up; with 0 it is past.
VARIANTS = [
    ("layernorm", "layernorm", {}),
    ("rmsnorm", "rmsnorm", {}),
    ("identity", "identity", {}),
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
    "batchnorm": (True, True, True),
    "causal_batchnorm": (False, False, True),
    "bln": (False, False, True),
    "bln_batch_time": (True, True, True),
    "powernorm_warmup": (True, True, True),
    "powernorm": (False, False, False),
}


def make_model(key, options, seed=0, config=SMALL):
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
    model = GPT(gpt_config("gpt2_124m"))  # block_size 1024, vocab 50257, biases
    assert model.num_params() == 124_439_808
    assert len(model.norm_modules()) == 25
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize(
    "key, norm_params", [("rmsnorm", 19_200), ("identity", 0), ("bln", 38_400)]
)
def test_gpt2_124m_parameter_count_per_norm(key, norm_params):
    options = {"batch_size": 8} if key == "bln" else {}
    cfg = gpt_config("gpt2_124m")
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
