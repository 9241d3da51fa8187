"""The norm layers against torch's own layers, the golden vectors of
tests/golden/norms_golden_vectors.md (from the official BLN and PowerNorm code, with provenance),
spec-derived references, causality and state, module by module.

The GPT-level causality matrix lives in test_model.py; here every module is probed on its own."""

import math

import pytest
import torch
import torch.nn.functional as F

from bln_sweeps.norms import NORMS, build_norm

# (label, registry key, options) for the tests every variant goes through; B = 4, T = 8 below
B, T, C = 4, 8, 12
VARIANTS = [
    ("layernorm", "layernorm", {}),
    ("layernorm_nobias", "layernorm", {"bias": False}),
    ("rmsnorm", "rmsnorm", {}),
    ("identity", "identity", {}),
    ("dyt", "dyt", {}),
    ("dyt_nobias", "dyt", {"alpha_init": 0.8, "bias": False}),
    ("batchnorm", "batchnorm", {}),
    ("causal_batchnorm", "causal_batchnorm", {}),
    ("bln", "bln", {"batch_size": B, "max_len": 16}),
    ("bln_batch_time", "bln", {"batch_size": B, "max_len": 16, "batch_axes": "batch_time"}),
    ("bln_cumavg", "bln", {"batch_size": B, "max_len": 16, "stats": "cumavg"}),
    ("bln_no_sqrt_d", "bln", {"batch_size": B, "max_len": 16, "scale_by_sqrt_d": False}),
    ("powernorm", "powernorm", {"groups": 3}),
    ("powernorm_warmup", "powernorm", {"groups": 3, "warmup_steps": 100}),
    ("powernorm_running", "powernorm", {"groups": 3, "backward_scale": "running"}),
]
IDS = [v[0] for v in VARIANTS]


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def make(key, options, seed=0):
    """A module with non-trivial affine parameters (so a swapped weight/bias shows)."""
    torch.manual_seed(seed)
    norm = build_norm(key, C, **options)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return norm


def buffers(norm):
    return {k: v.clone() for k, v in norm.named_buffers()}


def restore(norm, saved):
    with torch.no_grad():
        for k, v in norm.named_buffers():
            v.copy_(saved[k])


def train_steps(norm, steps=3, seed=10, batch=B, length=T):
    norm.train()
    with torch.no_grad():
        for i in range(steps):
            norm(rand(batch, length, C, seed=seed + i, scale=2.0, shift=0.5))


# -----------------------------------------------------------------------------
# registry and option errors


def test_registry_keys_and_declarations():
    expected = {"layernorm", "rmsnorm", "identity", "dyt", "batchnorm", "bln", "powernorm"}
    assert set(NORMS) == expected | {"causal_batchnorm"}
    for _, key, options in VARIANTS:
        norm = build_norm(key, C, **options)
        assert isinstance(norm, NORMS[key])
        assert isinstance(norm.causal_in_train, bool)
        assert isinstance(norm.uses_batch_stats, bool)
        assert isinstance(type(norm).has_params, bool)
        assert type(norm).has_params == bool(list(norm.parameters()))
    causal = {label: build_norm(k, C, **o).causal_in_train for label, k, o in VARIANTS}
    assert not causal["batchnorm"] and not causal["bln_batch_time"]
    assert not causal["powernorm_warmup"]
    assert causal["causal_batchnorm"] and causal["bln"] and causal["powernorm"]
    assert causal["dyt"] and not build_norm("dyt", C).uses_batch_stats


def test_unknown_norm_names_the_choices():
    msg = "unknown norm 'xyz'; valid choices: batchnorm, bln, causal_batchnorm, dyt, identity, "
    with pytest.raises(ValueError, match=msg):
        build_norm("xyz", C)


def test_unknown_option_names_norm_option_and_valid_options():
    with pytest.raises(
        ValueError, match="'momentum' for norm 'layernorm'; valid options: eps, bias"
    ):
        build_norm("layernorm", C, momentum=0.1)
    with pytest.raises(ValueError, match="'eps' for norm 'identity'; valid options: none"):
        build_norm("identity", C, eps=1e-5)
    with pytest.raises(ValueError, match="norm 'bln' needs option 'batch_size'"):
        build_norm("bln", C)


@pytest.mark.parametrize(
    "key, options, message",
    [
        ("bln", {"batch_size": 4, "stats": "foo"}, "stats='foo': valid choices: ema, cumavg"),
        ("bln", {"batch_size": 4, "batch_axes": "x"}, "batch_axes='x': valid choices: batch, "),
        ("bln", {"batch_size": 0}, "batch_size=0: must be an integer >= 1"),
        ("bln", {"batch_size": 4, "max_len": 0}, "max_len=0"),
        ("bln", {"batch_size": 4, "feature_moving_var": "yes"}, "feature_moving_var='yes'"),
        ("powernorm", {"backward_scale": "y"}, "backward_scale='y': valid choices: batch, running"),
        ("powernorm", {"groups": 0}, "groups=0: must be an integer >= 1"),
        ("powernorm", {"groups": 5}, "groups=5: must divide the norm width dim=12"),
        ("powernorm", {"warmup_steps": -1}, "warmup_steps=-1"),
        ("powernorm", {"accum_steps": 0}, "accum_steps=0"),
        ("batchnorm", {"momentum": 1.5}, "momentum=1.5"),
        ("layernorm", {"eps": 0.0}, "eps=0.0: must be a number > 0$"),
        (
            "bln",
            {"batch_size": 4, "momentum": -0.1},
            "momentum=-0.1: must be a number >= 0 and <= 1",
        ),
        ("layernorm", {"bias": "yes"}, "bias='yes': must be true or false"),
        ("dyt", {"alpha_init": 0.0}, "alpha_init=0.0: must be a number > 0$"),
        ("dyt", {"alpha_init": "big"}, "alpha_init='big': must be a number > 0$"),
    ],
)
def test_bad_option_values_raise_with_key_value_and_choices(key, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_norm(key, C, **options)


# -----------------------------------------------------------------------------
# LayerNorm and RMSNorm against torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(dtype, bias):
    ours = make("layernorm", {"bias": bias}).to(dtype)
    ref = torch.nn.LayerNorm(C, eps=1e-5, bias=bias).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x = rand(B, T, C, dtype=dtype, scale=30.0, shift=5.0)  # non-zero mean, large scale
    grad = rand(B, T, C, seed=1, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-6)
    torch.testing.assert_close(ya, F.layer_norm(x, (C,), ref.weight, ref.bias, 1e-5))
    ya.backward(grad), yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(getattr(ours, name).grad, p.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_matches_torch_and_the_formula(dtype):
    ours = make("rmsnorm", {"eps": 1e-6}).to(dtype)
    ref = torch.nn.RMSNorm(C, eps=1e-6).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x = rand(B, T, C, dtype=dtype, scale=3.0, shift=1.0)
    grad = rand(B, T, C, seed=1, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-6)
    formula = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * ref.weight
    torch.testing.assert_close(ya, formula, rtol=0, atol=1e-6)
    ya.backward(grad), yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=1e-5)


def test_rmsnorm_eps_is_inside_the_root():
    x = rand(2, 3, C, scale=1e-4)  # RMS ~1e-4: eps 1e-6 matters, and where it goes matters
    y = build_norm("rmsnorm", C, eps=1e-6)(x)
    rms = x.square().mean(-1, keepdim=True).sqrt()
    inside, outside = x / torch.sqrt(rms**2 + 1e-6), x / (rms + 1e-6)
    assert (inside - outside).abs().max() > 1e-2  # the two conventions are visibly different
    torch.testing.assert_close(y, inside)


def test_rmsnorm_is_scale_invariant_not_shift_invariant():
    norm = build_norm("rmsnorm", C, eps=1e-8)  # invariance is exact only up to eps
    x = rand(B, T, C)
    s = torch.rand(B, T, 1) * 10 + 0.5  # per-token rescale
    torch.testing.assert_close(norm(s * x), norm(x), rtol=0, atol=1e-5)
    assert (norm(x + 1.0) - norm(x)).abs().max() > 0.1


def test_rmsnorm_uses_the_explicit_eps_under_bf16():
    # bf16's own eps (7.8e-3, the default of eps=None) would dominate mean(x^2) ~ 2.5e-3 here
    x = rand(B, T, C, scale=0.05).bfloat16()
    norm = build_norm("rmsnorm", C, eps=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    ref = F.rms_norm(x.float(), (C,), eps=1e-5)
    bf16_default = F.rms_norm(x.float(), (C,), eps=torch.finfo(torch.bfloat16).eps)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    assert (y.float() - bf16_default).abs().max() > 0.1


# -----------------------------------------------------------------------------
# DyT (Zhu et al. 2025): y = weight * tanh(alpha * x) + bias, alpha one scalar per layer


def test_dyt_init_and_formula_are_the_official_codes():
    fresh = build_norm("dyt", C, alpha_init=0.7)
    assert fresh.alpha.shape == (1,) and fresh.alpha.item() == pytest.approx(0.7)
    assert torch.equal(fresh.weight, torch.ones(C)) and torch.equal(fresh.bias, torch.zeros(C))
    norm = make("dyt", {"alpha_init": 0.7})  # perturbed alpha, weight and bias
    x = rand(B, T, C, scale=3.0, shift=1.0)
    ref = torch.tanh(norm.alpha * x) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), ref, rtol=0, atol=1e-6)
    nobias = build_norm("dyt", C, bias=False)
    assert nobias.bias is None
    torch.testing.assert_close(nobias(x), torch.tanh(0.5 * x), rtol=0, atol=1e-6)


def test_dyt_gradients_are_the_analytic_ones():
    norm = make("dyt", {"alpha_init": 0.6}).double()
    x = rand(B, T, C, dtype=torch.float64, scale=2.0).requires_grad_()
    dy = rand(B, T, C, seed=1, dtype=torch.float64)
    norm(x).backward(dy)
    a, w = norm.alpha.detach(), norm.weight.detach()
    t = torch.tanh(a * x.detach())
    sech2 = 1 - t.square()  # d tanh(u) / du
    torch.testing.assert_close(x.grad, dy * w * sech2 * a)
    torch.testing.assert_close(norm.alpha.grad, (dy * w * sech2 * x.detach()).sum().view(1))
    torch.testing.assert_close(norm.weight.grad, (dy * t).sum((0, 1)))
    torch.testing.assert_close(norm.bias.grad, dy.sum((0, 1)))
    torch.autograd.gradcheck(norm, (x.detach().clone().requires_grad_(),))


def test_dyt_alpha_is_learned():
    """Fitting tanh(2x) from alpha_init 0.5: alpha goes where the data says (weight and bias may
    move too, but only alpha can bend the curve)."""
    norm = build_norm("dyt", C, alpha_init=0.5)
    x = rand(64, 1, C, scale=1.5)
    target = torch.tanh(2.0 * x)
    opt = torch.optim.Adam(norm.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        F.mse_loss(norm(x), target).backward()
        opt.step()
    assert norm.alpha.item() == pytest.approx(2.0, abs=0.1)
    assert F.mse_loss(norm(x), target).item() < 1e-4


# -----------------------------------------------------------------------------
# BatchNorm against nn.BatchNorm1d on (B, C, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_matches_batchnorm1d(dtype):
    ours = make("batchnorm", {}).to(dtype)
    ref = torch.nn.BatchNorm1d(C).to(dtype)
    ref.load_state_dict(ours.state_dict())
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    for step in range(3):
        x = rand(B, T, C, seed=step, dtype=dtype, scale=3.0, shift=2.0)
        grad = rand(B, T, C, seed=10 + step, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb.transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(ya, yb, rtol=0, atol=atol)
        ya.backward(grad), yb.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=atol)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(getattr(ours, name).grad, p.grad, rtol=0, atol=10 * atol)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=0, atol=atol)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    ours.eval(), ref.eval()
    x = rand(B, T, C, seed=99, dtype=dtype)
    torch.testing.assert_close(ours(x), ref(x.transpose(1, 2)).transpose(1, 2), rtol=0, atol=atol)


def test_masked_batchnorm_is_batchnorm_of_the_valid_tokens():
    ours, ref = make("batchnorm", {}), torch.nn.BatchNorm1d(C)
    ref.load_state_dict(ours.state_dict())
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 5:] = pad[3, 2:] = True
    x = rand(B, T, C, scale=2.0, shift=1.0)
    y = ours(x, pad)
    torch.testing.assert_close(y[~pad], ref(x[~pad]), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    # pad values matter neither to valid outputs nor to the running statistics
    other = make("batchnorm", {})
    x2 = x.clone()
    x2[pad] = float("nan")
    torch.testing.assert_close(other(x2, pad)[~pad], y[~pad], rtol=0, atol=0)
    assert torch.equal(other.running_mean, ours.running_mean)
    assert torch.equal(other.running_var, ours.running_var)


def test_batchnorm_needs_two_valid_tokens_in_train_mode():
    norm = build_norm("batchnorm", C)
    with pytest.raises(ValueError, match="batchnorm needs more than one valid token per batch"):
        norm(rand(1, 1, C))
    pad = torch.ones(2, 3, dtype=torch.bool)
    pad[0, 0] = False
    with pytest.raises(ValueError, match=r"more than one valid token .* \(got 1\)"):
        norm(rand(2, 3, C), pad)
    norm(rand(1, 2, C))  # B = 1 is fine when T > 1
    norm.eval()
    assert torch.isfinite(norm(rand(1, 1, C))).all()  # eval: running statistics


# -----------------------------------------------------------------------------
# causal BatchNorm (ours, §8.5)


def test_causal_batchnorm_statistics_pool_the_prefix_of_every_sequence():
    norm = make("causal_batchnorm", {}).double()
    x = rand(B, T, C, dtype=torch.float64, scale=2.0, shift=3.0)
    y = norm(x)
    for t in range(T):
        prefix = x[:, : t + 1].reshape(-1, C)
        var, mean = torch.var_mean(prefix, 0, correction=0)
        expected = (x[:, t] - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
        torch.testing.assert_close(y[:, t], expected, rtol=0, atol=1e-9)


def causal_batchnorm_reference(x, weight, bias, valid, eps=1e-5):
    """Position by position, with autograd: statistics of the valid tokens at positions <= t."""
    out = []
    for t in range(x.shape[1]):
        seen = x[:, : t + 1][valid[:, : t + 1]]  # (n, C)
        var, mean = torch.var_mean(seen, 0, correction=0)
        out.append((x[:, t] - mean) / torch.sqrt(var + eps) * weight + bias)
    return torch.stack(out, 1)


@pytest.mark.parametrize("masked", [False, True])
def test_causal_batchnorm_gradients_match_autograd_of_the_reference(masked):
    norm = make("causal_batchnorm", {}).double()
    x = rand(B, T, C, dtype=torch.float64, scale=2.0, shift=1.0)
    valid = torch.ones(B, T, dtype=torch.bool)
    if masked:
        valid[0, :2] = valid[2, 5:] = False
    dy = rand(B, T, C, seed=1, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w, b = (
        norm.weight.detach().clone().requires_grad_(),
        norm.bias.detach().clone().requires_grad_(),
    )
    norm(xa, ~valid if masked else None).backward(dy)
    causal_batchnorm_reference(xb, w, b, valid).backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(norm.weight.grad, w.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(norm.bias.grad, b.grad, rtol=0, atol=1e-9)


def test_causal_batchnorm_ignores_the_future_and_differs_from_batchnorm():
    causal, bn = make("causal_batchnorm", {}), make("batchnorm", {})
    x = rand(B, T, C, scale=2.0)
    for t in (0, 3, T - 2):
        x2 = x.clone()
        x2[:, t + 1 :] += rand(B, T - t - 1, C, seed=t + 1)  # every sequence's future
        saved = buffers(causal)
        a = causal(x)
        restore(causal, saved)
        assert torch.equal(causal(x2)[:, : t + 1], a[:, : t + 1])
        restore(causal, saved)
    assert (causal(x) - bn(x))[:, : T - 1].abs().max() > 1e-2
    # at the last position both pool every token
    torch.testing.assert_close(causal(x)[:, -1], bn(x)[:, -1], rtol=0, atol=1e-5)


def test_causal_batchnorm_running_stats_follow_batchnorm():
    causal, ref = make("causal_batchnorm", {}), torch.nn.BatchNorm1d(C)
    ref.load_state_dict(causal.state_dict())
    for step in range(3):
        x = rand(B, T, C, seed=step, scale=2.0, shift=4.0)
        causal(x), ref(x.transpose(1, 2))
    torch.testing.assert_close(causal.running_mean, ref.running_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(causal.running_var, ref.running_var, rtol=0, atol=1e-5)
    assert causal.num_batches_tracked.item() == 3
    causal.eval(), ref.eval()
    x = rand(B, T, C, seed=9)
    torch.testing.assert_close(causal(x), ref(x.transpose(1, 2)).transpose(1, 2), atol=1e-5, rtol=0)


def test_causal_batchnorm_masked_ignores_pad_values():
    norm = make("causal_batchnorm", {})
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, :3] = pad[2, 6:] = True  # left and right padding
    x = rand(B, T, C)
    saved = buffers(norm)
    y = norm(x, pad)
    after = buffers(norm)
    restore(norm, saved)
    x2 = x.clone()
    x2[pad] = float("inf")
    torch.testing.assert_close(norm(x2, pad)[~pad], y[~pad], rtol=0, atol=1e-6)
    for k, v in buffers(norm).items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=1e-6)
    ref = torch.nn.BatchNorm1d(C)
    ref.load_state_dict({**norm.state_dict(), **saved})
    ref(x[~pad])
    torch.testing.assert_close(norm.running_var, ref.running_var, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# BLN (§6): golden vectors from the official layer, then structure


def bln_reference(x, m, eps=1e-3, zeta=1e-4, sqrt_d=True, axes="batch"):
    """The official formula with current-batch statistics, no affine, in fp64."""
    x = x.double()
    var_f, mean_f = torch.var_mean(x, -1, correction=0, keepdim=True)
    dims = (0,) if axes == "batch" else (0, 1)
    var_b, mean_b = torch.var_mean(x, dims, correction=0, keepdim=True)
    xhat_f = (x - mean_f) / torch.sqrt(var_f + eps)
    xhat_b = (x - mean_b) / torch.sqrt(var_b + eps)
    y = (1 / m - zeta) * xhat_f + (1 - 1 / m - zeta) * xhat_b
    return y / math.sqrt(x.shape[-1]) if sqrt_d else y


BLN_X3 = [
    [[1, 2, 3, 4], [0, 1, 0, 1]],
    [[2, 0, 0, 2], [3, 1, 2, 2]],
    [[0, 0, 1, 5], [1, 1, 1, 1]],
]
BLN_Y3 = [
    [[-0.223450, 0.396585, 0.519709, 0.312495], [-0.522465, 0.166284, -0.574166, -0.068854]],
    [[0.574415, -0.402068, -0.522714, -0.278692], [0.680622, -0.235396, 0.407881, 0.470277]],
    [[-0.529098, -0.356752, -0.129451, 0.639020], [-0.089045, 0.0, 0.0, -0.235138]],
]


@pytest.mark.parametrize("masked", [False, True])  # the fused path and the general one
def test_bln_golden_vectors(masked):
    # 2-D official input (m, d) = our (m, 1, d)
    x2 = torch.tensor([[[1.0, 2, 3, 4]], [[2.0, 0, 0, 2]]])
    y2 = [[[-0.584661, 0.138089, 0.361631, 0.585034]], [[0.499277, -0.499650, -0.499720, 0.0]]]
    norm = build_norm("bln", 4, batch_size=2, max_len=1)
    pad = torch.zeros(2, 1, dtype=torch.bool) if masked else None
    torch.testing.assert_close(norm(x2, pad), torch.tensor(y2), rtol=0, atol=1e-5)
    norm = build_norm("bln", 4, batch_size=3, max_len=2)
    pad = torch.zeros(3, 2, dtype=torch.bool) if masked else None
    y3 = norm(torch.tensor(BLN_X3, dtype=torch.float32), pad)
    torch.testing.assert_close(y3, torch.tensor(BLN_Y3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("axes", ["batch", "batch_time"])
def test_bln_fused_and_general_paths_agree(axes):
    a = make("bln", {"batch_size": B, "max_len": T, "batch_axes": axes})
    b = make("bln", {"batch_size": B, "max_len": T, "batch_axes": axes})
    x = rand(B, T, C, scale=2.0, shift=1.0)
    grad = rand(B, T, C, seed=1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb, torch.zeros(B, T, dtype=torch.bool))
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-5)
    ya.backward(grad), yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=0, atol=1e-4)
    for (name, u), v in zip(a.named_buffers(), b.buffers(), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("axes", ["batch", "batch_time"])
def test_bln_is_a_weighted_sum_of_layernorm_and_batchnorm(axes):
    m = 5
    norm = build_norm("bln", C, batch_size=m, scale_by_sqrt_d=False, max_len=T, batch_axes=axes)
    x = rand(m, T, C, scale=2.0, shift=1.0)
    ln = F.layer_norm(x, (C,), eps=1e-3)
    if axes == "batch":  # per-position BN: T*C channels over the m sequences
        bn = torch.nn.BatchNorm1d(T * C, eps=1e-3, affine=False)(x.reshape(m, T * C))
    else:
        bn = torch.nn.BatchNorm1d(C, eps=1e-3, affine=False)(x.reshape(m * T, C))
    w_f, w_b = 1 / m - 1e-4, 1 - 1 / m - 1e-4
    expected = w_f * ln + w_b * bn.view(m, T, C)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(norm(x), bln_reference(x, m, sqrt_d=False, axes=axes).float())


@pytest.mark.parametrize("stats", ["ema", "cumavg"])
@pytest.mark.parametrize("axes", ["batch", "batch_time"])
def test_bln_batch_of_one_is_layernorm_and_stays_finite(stats, axes):
    norm = build_norm("bln", C, batch_size=1, max_len=T, stats=stats, batch_axes=axes)
    x = rand(1, T, C, scale=2.0, shift=1.0).requires_grad_()
    y = norm(x)
    expected = 0.9999 * F.layer_norm(x, (C,), eps=1e-3) / math.sqrt(C)
    if axes == "batch":  # batch branch = 0 exactly (one sequence per statistic)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    train_steps(norm, 2, batch=1)
    assert all(torch.isfinite(b).all() for b in norm.buffers())
    norm.eval()
    assert torch.isfinite(norm(x)).all()


def test_bln_large_batch_size_approaches_per_position_batchnorm():
    norm = build_norm("bln", C, batch_size=10**6, max_len=T)
    x = rand(B, T, C, scale=2.0)
    bn = torch.nn.BatchNorm1d(T * C, eps=1e-3, affine=False)(x.reshape(B, T * C)).view(B, T, C)
    torch.testing.assert_close(norm(x), bn / math.sqrt(C), rtol=0, atol=1e-3)  # zeta = 1e-4


def per_step_stats(x, axes):
    """Batch-branch mean / unbiased var rows and feature-branch per-position mean / var."""
    dims = (0,) if axes == "batch" else (0, 1)
    var_b, mean_b = torch.var_mean(x, dims, correction=1)
    var_f, mean_f = torch.var_mean(x, -1, correction=0, keepdim=True)
    rows = (lambda s: s) if axes == "batch" else (lambda s: s[None])
    return rows(mean_b), rows(var_b), mean_f.mean(0), var_f.mean(0)


@pytest.mark.parametrize("axes", ["batch", "batch_time"])
def test_bln_population_statistics_ema(axes):
    norm = build_norm("bln", C, batch_size=B, max_len=T + 3, batch_axes=axes, momentum=0.2)
    xs = [rand(B, T, C, seed=s, scale=2.0, shift=s) for s in range(3)]
    mean_b, var_b = torch.zeros(1, C), torch.ones(1, C)
    mean_f, var_f = torch.zeros(T, 1), torch.ones(T, 1)
    for x in xs:
        norm(x)
        mb, vb, mf, vf = per_step_stats(x, axes)
        mean_b, var_b = 0.8 * mean_b + 0.2 * mb, 0.8 * var_b + 0.2 * vb
        mean_f, var_f = 0.8 * mean_f + 0.2 * mf, 0.8 * var_f + 0.2 * vf
    rows = T if axes == "batch" else 1
    torch.testing.assert_close(norm.batch_mean[:rows], mean_b.expand(rows, C), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.batch_var[:rows], var_b.expand(rows, C), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(norm.feature_mean[:T], mean_f, atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.feature_var[:T], var_f, atol=1e-4, rtol=1e-5)
    if axes == "batch":  # rows past T were never seen
        assert torch.equal(norm.batch_mean[T:], torch.zeros(3, C))
        assert torch.equal(norm.batch_var[T:], torch.ones(3, C))
    assert norm.batch_count[:rows].tolist() == [3] * rows
    assert norm.feature_count.tolist() == [3] * T + [0] * 3


@pytest.mark.parametrize("axes", ["batch", "batch_time"])
def test_bln_population_statistics_cumavg(axes):
    norm = build_norm("bln", C, batch_size=B, max_len=T, batch_axes=axes, stats="cumavg")
    short = T // 2  # a shorter second batch: its rows are averaged over 2 steps, the rest over 1
    x1, x2 = rand(B, T, C, seed=1, scale=2.0), rand(B, short, C, seed=2, scale=3.0, shift=1.0)
    norm(x1), norm(x2)
    s1, s2 = per_step_stats(x1, axes), per_step_stats(x2, axes)
    if axes == "batch":
        for i in range(2):  # mean and var (with the B/(B-1) factor)
            got = getattr(norm, ("batch_mean", "batch_var")[i])
            torch.testing.assert_close(got[:short], (s1[i][:short] + s2[i]) / 2, atol=1e-5, rtol=0)
            torch.testing.assert_close(got[short:], s1[i][short:], atol=1e-5, rtol=0)
        assert norm.batch_count.tolist() == [2] * short + [1] * (T - short)
    else:  # one row; n = B * T elements per step
        torch.testing.assert_close(norm.batch_mean, (s1[0] + s2[0]) / 2, atol=1e-5, rtol=0)
        torch.testing.assert_close(norm.batch_var, (s1[1] + s2[1]) / 2, atol=1e-5, rtol=0)
        assert norm.batch_count.tolist() == [2]
    torch.testing.assert_close(norm.feature_mean[:short], (s1[2][:short] + s2[2]) / 2)
    torch.testing.assert_close(norm.feature_var[short:], s1[3][short:])
    norm.reset_population_stats()
    assert not norm.batch_mean.any() and (norm.batch_var == 1).all()
    assert not norm.batch_count.any() and not norm.feature_count.any()
    norm(x2)  # the first update after a reset is the batch's own statistics
    torch.testing.assert_close(norm.feature_mean[:short], s2[2])


def test_bln_eval_uses_the_frozen_population_statistics():
    norm = make("bln", {"batch_size": B, "max_len": 16})
    train_steps(norm)
    norm.eval()
    x = rand(B, T, C, seed=5)
    var_f, mean_f = torch.var_mean(x, -1, correction=0, keepdim=True)  # current token (default)
    xhat_f = (x - mean_f) / torch.sqrt(var_f + 1e-3)
    xhat_b = (x - norm.batch_mean[:T]) / torch.sqrt(norm.batch_var[:T] + 1e-3)
    mix = ((1 / B - 1e-4) * xhat_f + (1 - 1 / B - 1e-4) * xhat_b) / math.sqrt(C)
    before = buffers(norm)
    torch.testing.assert_close(norm(x), norm.weight * mix + norm.bias, rtol=0, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in norm.named_buffers())
    # feature population statistics, per position
    norm.feature_moving_mean = norm.feature_moving_var = True
    xhat_f = (x - norm.feature_mean[:T]) / torch.sqrt(norm.feature_var[:T] + 1e-3)
    mix = ((1 / B - 1e-4) * xhat_f + (1 - 1 / B - 1e-4) * xhat_b) / math.sqrt(C)
    torch.testing.assert_close(norm(x), norm.weight * mix + norm.bias, rtol=0, atol=1e-6)


def test_bln_inference_switches_change_eval():
    norm = make("bln", {"batch_size": B, "max_len": 16})
    train_steps(norm)
    norm.eval()
    x = rand(B, T, C, seed=7, scale=3.0, shift=2.0)  # far from the population statistics
    default = norm(x)
    switches = [
        "batch_moving_mean",
        "batch_moving_var",
        "feature_moving_mean",
        "feature_moving_var",
    ]
    for name in switches:
        setattr(norm, name, not getattr(norm, name))
        assert (norm(x) - default).abs().max() > 1e-3, name
        setattr(norm, name, not getattr(norm, name))
    for name in switches:  # all False: the train-mode formula on the current batch
        setattr(norm, name, False)
    expected = norm.weight * bln_reference(x, B).float() + norm.bias
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-5)


def test_bln_padding_uses_the_sequences_valid_at_each_position():
    norm, sub = (
        make("bln", {"batch_size": B, "max_len": T}),
        make("bln", {"batch_size": B, "max_len": T}),
    )
    x = rand(B, T, C, scale=2.0)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[3, 5:] = True  # sequence 3 ends early
    y = norm(x, pad)
    y_sub = sub(x[:3])  # the three sequences valid everywhere (same configured m)
    torch.testing.assert_close(y[:3, 5:], y_sub[:, 5:], rtol=0, atol=1e-5)
    torch.testing.assert_close(norm.batch_mean[5:T], sub.batch_mean[5:T], rtol=0, atol=1e-6)
    assert (y[:3, :5] - y_sub[:, :5]).abs().max() > 1e-3  # before that, four sequences pool
    x2 = x.clone()
    x2[pad] = float("nan")
    other = make("bln", {"batch_size": B, "max_len": T})
    torch.testing.assert_close(other(x2, pad)[~pad], y[~pad], rtol=0, atol=1e-6)
    for k, v in other.named_buffers():
        torch.testing.assert_close(v, getattr(norm, k), rtol=0, atol=1e-6)


def test_bln_rejects_sequences_longer_than_max_len():
    norm = build_norm("bln", C, batch_size=B, max_len=T)
    with pytest.raises(ValueError, match=f"sequence length {T + 1} exceeds max_len={T}"):
        norm(rand(B, T + 1, C))
    norm.eval()
    with pytest.raises(ValueError, match="max_len"):
        norm(rand(B, T + 1, C))
    norm(rand(B, T - 3, C))  # shorter is fine: the first rows


# -----------------------------------------------------------------------------
# PowerNorm (§7): golden vectors from the official code, then a spec-derived reference


def test_powernorm_golden_vectors():
    norm = build_norm("powernorm", 4, groups=2, warmup_steps=1)  # W = 1 call
    steps = [
        dict(
            x=[[1, 2, 3, 4], [2, 0, 0, 2]],
            y=[[0.577348, 1.414205, 1.414194, 0.883451], [1.290989, 0, 0, 1.104311]],
            phi=[1.019999, 0.98, 0.936, 1.063999],
            e=[0.934169, 0.707102, 0.707097, 0.993881],
            dx=[[0.179039, -0.089516, 0.195681, -0.14676], [3e-06, 0.790564, 1.178492, 3e-06]],
        ),
        dict(
            x=[[0, 1, 0, 3], [1, 1, 2, 0]],
            y=[[0, 1.42855, 0, 1.371014], [0.990138, 1.010143, 1.461752, 0]],
            phi=[0.967999, 1.031997, 0.942399, 1.057599],
            e=[1.383446, 1.818222, 1.36243, 1.585979],
            dx=[[1.99997, 2.1e-05, 0.471403, 1e-06], [0.262618, -0.262598, 3e-06, 0.707102]],
        ),
        dict(
            x=[[2, 1, 1, 1], [0, 3, 1, 1]],
            y=[[1.28564, 0.622569, 1.030097, 0.972378], [0, 1.392109, 1.030097, 0.972378]],
            phi=[0.951199, 1.048797, 0.948159, 1.051838],
            e=[1.911933, 2.614142, 2.247959, 2.4084],
        ),
    ]
    for step in steps:
        x = torch.tensor([step["x"]], dtype=torch.float32, requires_grad=True)  # B=1, T=2
        y = norm(x)
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(y[0], torch.tensor(step["y"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(norm.running_phi, torch.tensor(step["phi"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(norm.ema_gz, torch.tensor(step["e"]), rtol=0, atol=1e-5)
        if "dx" in step:
            torch.testing.assert_close(x.grad[0], torch.tensor(step["dx"]), rtol=0, atol=1e-5)
    norm.eval()
    y = norm(torch.tensor([steps[0]["x"]], dtype=torch.float32))
    expected = [[0.648472, 1.235126, 0.871412, 1.103134], [1.450027, 0, 0, 1.378915]]
    torch.testing.assert_close(y[0], torch.tensor(expected), rtol=0, atol=1e-5)
    assert norm.iters.item() == 3


def group_scale(x, groups):
    xg = x.view(*x.shape[:-1], groups, -1)
    return (xg / torch.sqrt(xg.square().mean(-1, keepdim=True) + 1e-5)).view(x.shape)


def powernorm_reference(norm, x, dy, pad, k, phi, e, scale="batch"):
    """One train step of §7.2-7.4 written out in fp64: returns y, phi, e, dx, dweight, dbias."""
    x = x.double().requires_grad_()
    dy, phi, e = dy.double(), phi.double(), e.double()
    w, b = norm.weight.detach().double(), norm.bias.detach().double()
    W, eps, a_f, a_b = norm.warmup_calls, norm.eps, norm.alpha_fwd, norm.alpha_bkw
    u = group_scale(x, norm.groups)
    valid = ~pad if pad is not None else torch.ones(x.shape[:2], dtype=torch.bool)
    q = u.detach()[valid].square().mean(0)
    denom = q if k <= W else phi
    z = u.detach() / torch.sqrt(denom + eps)
    y = w * z + b
    if k < W:
        phi = phi * (k - 1) / k + q / k
    phi = a_f * phi + (1 - a_f) * q
    g = w * dy
    gt = g - (1 - a_b) * e * z
    e = e + (gt * z).mean((0, 1))  # over all slots, pads included
    du = gt / torch.sqrt((q if scale == "batch" else denom) + eps)
    (dx,) = torch.autograd.grad(u, x, du)
    return y, phi, e, dx, (dy * z).sum((0, 1)), dy.sum((0, 1))


@pytest.mark.parametrize("scale", ["batch", "running"])
def test_powernorm_matches_the_spec_reference_through_warmup(scale):
    # W = 3 calls: k = 1, 2 get the cumulative-average step, k = 3 is the last warm-up call
    norm = make("powernorm", {"groups": 3, "warmup_steps": 3, "backward_scale": scale})
    phi, e = norm.running_phi.clone(), norm.ema_gz.clone()
    for k in range(1, 7):
        x = rand(B, T, C, seed=k, scale=1.0 + k, shift=0.3)
        dy = rand(B, T, C, seed=100 + k)
        pad = None
        if k % 2 == 0:  # masked steps: q over valid tokens only, pads' dy = 0 as from the loss
            pad = torch.zeros(B, T, dtype=torch.bool)
            pad[1, 4:] = True
            dy[pad] = 0.0
        assert norm.in_warmup == (k <= 3)
        ref = powernorm_reference(norm, x, dy, pad, k, phi, e, scale)
        xg = x.clone().requires_grad_()
        norm.weight.grad = norm.bias.grad = None
        y = norm(xg, pad)
        y.backward(dy)
        got = (y, norm.running_phi, norm.ema_gz, xg.grad, norm.weight.grad, norm.bias.grad)
        names = ("y", "phi", "e", "dx", "dweight", "dbias")
        for name, a, r in zip(names, got, ref, strict=True):
            torch.testing.assert_close(a.double(), r.detach(), rtol=1e-4, atol=1e-5, msg=name)
        phi, e = ref[1], ref[2]
    assert norm.iters.item() == 6


def test_powernorm_after_warmup_divides_by_phi_before_the_update():
    norm = make("powernorm", {"groups": 3})  # W = 0: running phi from the first call
    train_steps(norm, 2)
    phi_before = norm.running_phi.clone()
    x = rand(B, T, C, seed=3, scale=4.0)
    y = norm(x)
    expected = norm.weight * group_scale(x, 3) / torch.sqrt(phi_before + norm.eps) + norm.bias
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    assert (norm.running_phi - phi_before).abs().max() > 1e-3  # phi_after differs: not used


def test_powernorm_backward_is_the_approximation_not_autograd():
    norm = make("powernorm", {"groups": 3})
    train_steps(norm, 2)
    saved = buffers(norm)
    x = rand(B, T, C, seed=4, scale=2.0).requires_grad_()
    dy = rand(B, T, C, seed=5)
    norm(x).backward(dy)
    approx = x.grad.clone()
    # autograd of the naive forward: y = w * GS(x) / sqrt(phi_before + eps) + b
    xn = x.detach().clone().requires_grad_()
    y = norm.weight * group_scale(xn, 3) / torch.sqrt(saved["running_phi"] + norm.eps) + norm.bias
    y.backward(dy)
    assert (approx - xn.grad).abs().max() > 1e-2


def test_powernorm_ema_gz_accumulates():
    norm = make("powernorm", {"groups": 3, "alpha_bkw": 0.8})
    values = [norm.ema_gz.clone()]
    for step in range(3):
        x = rand(B, T, C, seed=step).requires_grad_()
        norm(x).backward(rand(B, T, C, seed=50 + step))
        values.append(norm.ema_gz.clone())
    assert all((b - a).abs().max() > 1e-4 for a, b in zip(values, values[1:], strict=False))


def test_powernorm_eval_changes_no_buffer_and_iters_count_train_calls():
    norm = make("powernorm", {"groups": 3})
    train_steps(norm, 2)
    assert norm.iters.item() == 2
    norm.eval()
    saved = buffers(norm)
    x = rand(B, T, C).requires_grad_()
    y = norm(x)
    y.sum().backward()
    assert all(torch.equal(v, saved[k]) for k, v in norm.named_buffers())
    expected = norm.weight * group_scale(x, 3) / torch.sqrt(norm.running_phi + norm.eps) + norm.bias
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_powernorm_warmup_is_counted_in_micro_batches():
    # 2 optimizer steps of 3 accumulated micro-batches = 6 train-mode forward calls
    norm = build_norm("powernorm", C, groups=3, warmup_steps=2, accum_steps=3)
    assert norm.warmup_calls == 6 and not norm.causal_in_train
    seen = []
    for step in range(4):
        for micro in range(3):
            seen.append(norm.in_warmup)
            norm(rand(B, T, C, seed=10 * step + micro))
        norm.eval()
        norm(rand(B, T, C))  # evaluation between steps does not count
        norm.train()
    assert seen == [True] * 6 + [False] * 6
    assert norm.iters.item() == 12
    assert build_norm("powernorm", C, warmup_steps=0, accum_steps=3).causal_in_train


def test_group_scaling_gives_unit_rms_per_group():
    norm = build_norm("powernorm", C, groups=3)
    u = norm.group_scale(rand(B, T, C, scale=5.0, shift=2.0))
    rms = u.view(B, T, 3, C // 3).square().mean(-1)
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-5)


def test_powernorm_backward_scale_running_divides_by_phi():
    # same forward; the x-gradients differ by exactly the per-channel sqrt((q+eps)/(phi+eps))
    a = make("powernorm", {"groups": 1})
    b = make("powernorm", {"groups": 1, "backward_scale": "running"})
    train_steps(a, 2), train_steps(b, 2)
    phi = a.running_phi.clone()
    x = rand(B, T, C, seed=6, scale=3.0)
    dy = rand(B, T, C, seed=7)
    grads = []
    for norm in (a, b):
        u = norm.group_scale(x).detach().requires_grad_()  # look at the gradient w.r.t. u
        out = norm._train_forward(u, None)
        out.backward(dy)
        grads.append(u.grad)
    q = norm.group_scale(x).square().mean((0, 1))
    ratio = torch.sqrt((q + 1e-5) / (phi + 1e-5))
    torch.testing.assert_close(grads[1], grads[0] * ratio, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# every variant: causality, batch independence, state, bf16, batch size one


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=IDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_causality_matches_the_declaration(label, key, options, train):
    norm = make(key, options)
    train_steps(norm, 2)
    norm.train(train)
    x = rand(B, T, C, scale=2.0, shift=0.5)
    causal = norm.causal_in_train or not train  # every default eval config is causal
    for k in (1, T // 2, T - 1):
        x2 = x.clone()
        x2[0, k] += 3.0 * rand(C, seed=k)
        saved = buffers(norm)
        a = norm(x)
        restore(norm, saved)
        b = norm(x2)
        restore(norm, saved)
        change = (a - b)[:, :k].abs().max().item()  # positions < k of every sequence
        if causal:
            assert change == 0.0, (label, k)
        else:
            assert change > 1e-4, (label, k)


def test_bln_eval_with_batch_statistics_depends_on_the_batch():
    norm = make("bln", {"batch_size": B, "max_len": 16, "batch_axes": "batch_time"})
    train_steps(norm)
    norm.eval()
    norm.batch_moving_mean = norm.batch_moving_var = False
    x = rand(B, T, C)
    x2 = x.clone()
    x2[1, -1] += 5.0
    assert (norm(x)[0, 0] - norm(x2)[0, 0]).abs().max() > 1e-4  # leaks, as in train mode


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=IDS)
def test_eval_is_batch_independent(label, key, options):
    norm = make(key, options)
    train_steps(norm)
    norm.eval()
    x = rand(4, T, C, seed=3)
    torch.testing.assert_close(norm(x[:1])[0], norm(x)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=IDS)
def test_state_dict_round_trip_reproduces_eval(label, key, options):
    norm = make(key, options)
    train_steps(norm)
    clone = make(key, options, seed=123)
    clone.load_state_dict(norm.state_dict())
    norm.eval(), clone.eval()
    x = rand(B, T, C, seed=4)
    assert torch.equal(norm(x), clone(x))
    names = set(norm.state_dict())
    if key == "bln":
        assert {"batch_mean", "batch_var", "batch_count", "feature_count"} <= names
    if key == "powernorm":
        assert {"running_phi", "ema_gz", "iters"} <= names
    if key.endswith("batchnorm"):
        assert {"running_mean", "running_var", "num_batches_tracked"} <= names


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=IDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bf16_autocast_is_finite_with_fp32_statistics(label, key, options, train):
    norm = make(key, options)
    norm.train(train)
    x = rand(B, T, C, scale=30.0, shift=10.0)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(xb)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    (y.float() * rand(B, T, C, seed=1)).sum().backward()
    assert torch.isfinite(xb.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in norm.parameters())
    assert all(torch.isfinite(b).all() for b in norm.buffers() if b.is_floating_point())
    ref = make(key, options).train(train)  # fp32 on the same (bf16-rounded) input
    torch.testing.assert_close(y.float(), ref(xb.detach().float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=IDS)
def test_batch_of_one(label, key, options):
    options = {**options, "batch_size": 1} if key == "bln" else options
    norm = make(key, options)
    x = rand(1, T, C, scale=2.0).requires_grad_()
    y = norm(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    if key == "batchnorm":  # B * T = 1: a clear error (§9.3 item 12)
        with pytest.raises(ValueError, match="more than one valid token"):
            norm(rand(1, 1, C))
    else:
        assert torch.isfinite(norm(rand(1, 1, C))).all()
    assert all(torch.isfinite(b).all() for b in norm.buffers() if b.is_floating_point())
    norm.eval()
    assert torch.isfinite(norm(x)).all()
