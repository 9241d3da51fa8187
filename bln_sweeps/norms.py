"""The normalization layers under comparison, and their registry.

Every variant is an `nn.Module` built as `build_norm(name, dim, **options)` with one interface:

    y = norm(x, pad_mask=None)    # x (B, T, C); pad_mask (B, T) bool, True = padding; y (B, T, C)

and two declarations the trainer and the tests rely on:

- `causal_in_train`: does the train-mode output at position t depend only on positions <= t (of
  every sequence in the batch)? False means the layer "leaks" the future through batch statistics
  (NORMS.md §8.2), so its train-mode loss is optimistic and only the eval-mode loss is honest.
- `uses_batch_stats`: does it compute statistics over the batch (and keep running ones)?

Statistics are always computed in fp32, with autocast off, and the output is cast back to the
input dtype, so bf16 runs stay finite. Pad slots never enter a statistic; their outputs are
arbitrary and the loss must ignore them. The facts and formulas are from
`research/NORMS.md` (§3 LayerNorm, §4 RMSNorm, §5 BatchNorm, §6 BLN, §7 PowerNorm, §8.5 our
causal BatchNorm); the section numbers below refer to it.
"""

import inspect
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# option checks: user input, so ValueError naming the key, the value and what is valid


def _check_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}: must be an integer >= {minimum}")


def _check_float(key: str, value, low: float, high: float = math.inf, open_low=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (value > low if open_low else value >= low) or value > high:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        upper = "" if high == math.inf else f" and <= {high:g}"
        raise ValueError(f"{key}={value!r}: must be a number {bound}{upper}")


def _check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: must be true or false")


def _check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: valid choices: {', '.join(choices)}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the statistics; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _column_sum(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of x (..., C) over all other dims -> (C,). A matrix-vector product: one
    read of x, where torch's strided sum over dim 0 is several times slower on CPU."""
    rows = x.reshape(-1, x.shape[-1])
    return rows.new_ones(rows.shape[0]) @ rows


def _fp32(x: torch.Tensor):
    """Context for the statistics: autocast off (we upcast explicitly)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# -----------------------------------------------------------------------------
# Batch statistics across ranks (option `sync`): "local" reduces over this rank's micro-batch,
# "global" over the micro-batches of every rank of the default process group (SyncBatchNorm
# semantics). Statistics are built from sums, and the sums are all-reduced with the autograd-aware
# all_reduce, whose backward all-reduces the incoming gradient: rank r's input moves every rank's
# statistics, so its gradient collects every rank's loss through them, exactly as one process
# holding the whole global batch would compute it.

SYNCS = ("local", "global")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _group_sum(t: torch.Tensor, sync: str) -> torch.Tensor:
    """t summed over the ranks when sync == "global" and several ranks run; else t itself."""
    if sync == "local" or not _distributed():
        return t
    if not t.requires_grad:
        t = t.clone()
        dist.all_reduce(t)
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


# -----------------------------------------------------------------------------
# The compile path. Under torch.compile (`train.compile=true`) every norm runs a formulation
# Inductor can fuse: plain differentiable ops, or an autograd.Function whose forward and backward
# are plain ops (Dynamo traces both into the graph). The hand-written kernels-by-composition of
# the eager path (out= buffers, borrowed ATen backward kernels, matrix-vector column sums) are
# faster eagerly but opaque to fusion. The branch is on `torch.compiler.is_compiling()`, which
# is a constant while Dynamo traces, so it costs no guard and no graph break.


def _compiling() -> bool:
    return torch.compiler.is_compiling()


@torch.library.custom_op("bln_sweeps::snapshot", mutates_args=())
def _snapshot(x: torch.Tensor) -> torch.Tensor:
    """A copy of a buffer's value before this call updates it, as an opaque op. Inductor's
    partitioner may recompute a plain `buffer.clone()` in the backward graph, which then reads the
    buffer after the forward's in-place update (pytorch/pytorch#197039, silently wrong
    gradients); it never recomputes an opaque custom op, so this copy is saved instead."""
    return x.clone()


@_snapshot.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


# -----------------------------------------------------------------------------
# RMS scaling as an autograd Function: torch's F.rms_norm is a chain of unfused ops on CPU (about
# 5x LayerNorm's fwd+bwd time), while LayerNorm has fused kernels. The RMSNorm gradient is the
# LayerNorm gradient with the centring term removed, so we borrow LayerNorm's fused backward
# kernel with mean = 0 and add that term back.


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        # x (..., D) fp32; r = 1 / sqrt(mean(x^2) + eps) per row, eps inside the root (torch's)
        d = x.shape[-1]
        r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / d + eps)
        y = x * r
        if weight is not None:
            y.mul_(weight)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        d = x.shape[-1]
        dy = dy.contiguous()
        with _fp32(dy):
            # LayerNorm's backward with mean 0: r * (g - mean(g) - xhat * mean(g * xhat)), where
            # g = dy * weight and xhat = x * r. RMSNorm's lacks the "- mean(g)": add r * mean(g).
            mask = [True, weight is not None and ctx.needs_input_grad[1], False]
            dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
                dy, x, [d], torch.zeros_like(r), r, weight, None, mask
            )
            g_mean = (dy @ weight if weight is not None else dy.sum(-1)).unsqueeze(-1) / d
            dx.add_(r * g_mean)
        return dx, dw, None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if _compiling():  # one reduction and one pointwise kernel each way once fused
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        return y if weight is None else y * weight
    return _RMSNormFunction.apply(x, weight, eps)


# -----------------------------------------------------------------------------
# per-token norms: causal and batch-independent in both modes


class LayerNorm(nn.Module):
    """GPT-2's LayerNorm (§3): per token, mean and biased variance over C. Same as
    torch.nn.LayerNorm(dim, eps, bias=bias)."""

    has_params = True

    def __init__(self, dim: int, *, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        _check_float("eps", eps, 0.0, open_low=True)
        _check_bool("bias", bias)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_parameter("bias", nn.Parameter(torch.zeros(dim)) if bias else None)
        self.causal_in_train = True
        self.uses_batch_stats = False

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        with _fp32(x):
            y = F.layer_norm(_upcast(x), (x.shape[-1],), self.weight, self.bias, self.eps)
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm (§4): x / sqrt(mean_c(x^2) + eps) * weight, no centring, no bias. eps is explicit
    and inside the root (torch.nn.RMSNorm's convention), never the dtype-dependent default."""

    has_params = True

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        _check_float("eps", eps, 0.0, open_low=True)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.causal_in_train = True
        self.uses_batch_stats = False

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        with _fp32(x):
            y = _rms_norm(_upcast(x), self.weight, self.eps)
        return y.to(x.dtype)


class Identity(nn.Module):
    """No normalization: a control."""

    has_params = False

    def __init__(self, dim: int):
        super().__init__()
        self.causal_in_train = True
        self.uses_batch_stats = False

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


# -----------------------------------------------------------------------------
# BatchNorm over all valid B x T tokens per channel (§5), and our causal variant (§8.5)


class BatchNorm(nn.Module):
    """BatchNorm as used for NLP (§5.1): per channel, mean and biased variance over every valid
    (b, t) token; PyTorch running-stat conventions (EMA with `momentum`, unbiased variance in the
    update, running_mean 0 / running_var 1 at init, num_batches_tracked). Equals
    nn.BatchNorm1d(dim) on x.transpose(1, 2), except that pad tokens are left out of the
    statistics. Eval uses the running statistics. Train mode LEAKS: every position sees every
    other position of the batch through the statistics."""

    has_params = True

    def __init__(self, dim: int, *, eps: float = 1e-5, momentum: float = 0.1, sync: str = "local"):
        super().__init__()
        _check_float("eps", eps, 0.0, open_low=True)
        _check_float("momentum", momentum, 0.0, 1.0)
        _check_choice("sync", sync, SYNCS)
        self.eps, self.momentum, self.sync = eps, momentum, sync
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.causal_in_train = False
        self.uses_batch_stats = True

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        with _fp32(x):
            xf = _upcast(x)
            if self.training:
                y = self._train_forward(xf, pad_mask)
            else:  # a fixed per-channel affine map: causal and batch-independent
                flat = xf.reshape(B * T, C)
                y = F.batch_norm(
                    flat,
                    self.running_mean,
                    self.running_var,
                    self.weight,
                    self.bias,
                    False,
                    0.0,
                    self.eps,
                ).view(B, T, C)
        return y.to(x.dtype)

    def _train_forward(self, xf: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = xf.shape
        if self.sync == "global" or (pad_mask is not None and _compiling()):
            return self._train_forward_sums(xf, pad_mask)
        n = B * T if pad_mask is None else int((~pad_mask).sum())  # valid tokens
        if n <= 1:
            raise ValueError(
                f"batchnorm needs more than one valid token per batch in train mode (got {n}); "
                "use a larger batch.size or seq.len"
            )
        self.num_batches_tracked.add_(1)
        if pad_mask is None:
            flat = xf.reshape(B * T, C)
        else:
            flat = xf[~pad_mask]  # (n, C): the statistics and the running update see valid only
        y = F.batch_norm(
            flat,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            True,
            self.momentum,
            self.eps,
        )
        if pad_mask is None:
            return y.view(B, T, C)
        return xf.new_zeros(B, T, C).masked_scatter(~pad_mask[..., None], y)  # pads -> 0

    def _train_forward_sums(self, xf: torch.Tensor, pad_mask: torch.Tensor | None):
        """The train forward from (masked) sums: for sync="global", whose sums are all-reduced,
        and for the padded case under torch.compile, where `xf[~pad_mask]` (a data-dependent
        shape) and the n <= 1 check (a host sync) cannot be. No n <= 1 check here."""
        B, T, _ = xf.shape
        valid = xf.new_ones(B, T, 1) if pad_mask is None else (~pad_mask)[..., None].to(xf.dtype)
        n = _group_sum(valid.sum(), self.sync)  # valid tokens, over the ranks for "global"
        mean = _group_sum((xf * valid).sum((0, 1)), self.sync) / n.clamp_min(1)  # (C,)
        sq = ((xf - mean) * valid).square().sum((0, 1))
        var = _group_sum(sq, self.sync) / n.clamp_min(1)  # (C,) biased
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        with torch.no_grad():  # F.batch_norm's update: EMA with the unbiased variance
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1).clamp_min(1), self.momentum)
        return y * valid  # pads -> 0


class CausalBatchNorm(BatchNorm):
    """OUR OWN variant (not from a paper; NORMS §8.5): BatchNorm whose train-mode statistics at
    position t pool the valid tokens {(b, s): s <= t} of every sequence, computed with cumulative
    sums over time. Causal in positions (but cross-sequence) in train mode. The running statistics
    are updated like BatchNorm's from the whole batch's statistics, and eval uses them. With B = 1
    the statistic at t = 0 is a single token (variance 0): finite, just uninformative."""

    def __init__(self, dim: int, *, eps: float = 1e-5, momentum: float = 0.1, sync: str = "local"):
        if sync != "local":  # its cumulative sums would need an all-reduce per position
            raise ValueError(f"sync={sync!r}: causal_batchnorm supports only sync=local")
        super().__init__(dim, eps=eps, momentum=momentum)
        self.causal_in_train = True

    def _train_forward(self, xf: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        # The running mean (from earlier steps: a constant here) shifts x before the sums of
        # squares, so that E[x^2] - E[x]^2 does not cancel catastrophically.
        shift = _snapshot(self.running_mean)
        valid = None if pad_mask is None else ~pad_mask
        y, mean, var, n = _CausalBatchNormFunction.apply(
            xf, self.weight, self.bias, shift, valid, self.eps
        )
        with torch.no_grad():  # running update from the whole batch = the statistics at T - 1
            self.num_batches_tracked.add_(1)
            unbiased = var * n / (n - 1).clamp_min(1)  # n = 1: no Bessel factor
            seen = n > 0
            new_mean = torch.lerp(self.running_mean, mean, self.momentum)
            new_var = torch.lerp(self.running_var, unbiased, self.momentum)
            self.running_mean.copy_(torch.where(seen, new_mean, self.running_mean))
            self.running_var.copy_(torch.where(seen, new_var, self.running_var))
        return y


class _CausalBatchNormFunction(torch.autograd.Function):
    """Causal BatchNorm's train-mode forward with a hand-written backward (autograd through the
    cumulative sums keeps several (B, T, C) intermediates alive; this keeps none but x).

    Forward, per channel, with v the valid mask and n_t = sum_{b, s <= t} v_bs:
        mean_t = sum_{b, s <= t} v x / n_t,  var_t = sum_{b, s <= t} v (x - mean_t)^2 / n_t
        y_bt = weight * (x_bt - mean_t) * rstd_t + bias,  rstd_t = 1 / sqrt(var_t + eps)
    Backward: every slot's output used mean_t and var_t (pads too), and a valid token x_bs
    entered them for every t >= s with d mean_t / dx = 1/n_t, d var_t / dx = 2 (x - mean_t)/n_t:
        dx_bs = weight * rstd_s * dy_bs + v_bs * sum_{t >= s} (g_mean_t + 2 g_var_t (x_bs -
                mean_t)) / n_t
    with g_mean_t = dL/dmean_t, g_var_t = dL/dvar_t: reverse cumulative sums over t."""

    @staticmethod
    def forward(ctx, x, weight, bias, shift, valid, eps):
        # x (B, T, C); valid (B, T) bool or None; shift (C,)
        B, T, C = x.shape
        ones = x.new_ones(B)
        xs = x - shift  # scratch (B, T, C)
        if valid is not None:
            xs.masked_fill_(~valid[..., None], 0.0)
        s1 = (ones @ xs.view(B, T * C)).view(T, C)  # sums over the batch, per position
        s2 = (ones @ xs.square_().view(B, T * C)).view(T, C)
        del xs
        count = x.new_full((T, 1), B) if valid is None else valid.sum(0).to(x.dtype)[:, None]
        n = count.double().cumsum(0)  # (T, 1) valid tokens at positions <= t
        inv_n = torch.where(n > 0, 1.0 / n.clamp_min(1), 0.0)  # no valid token yet: no stats
        mean_s = s1.double().cumsum(0) * inv_n  # (T, C), of the shifted x; fp64 running sums
        var = (s2.double().cumsum(0) * inv_n - mean_s.square()).clamp_min(0)  # biased
        mean = (mean_s + shift).to(x.dtype)
        rstd = torch.rsqrt(var.to(x.dtype) + eps)
        scale = weight * rstd  # (T, C)
        y = torch.addcmul(bias - scale * mean, x, scale)
        ctx.save_for_backward(x, valid, weight, mean, rstd, inv_n)
        last = (mean[-1].clone(), var[-1].to(x.dtype), n[-1].to(x.dtype))  # the whole batch
        ctx.mark_non_differentiable(*last)
        return y, *last

    @staticmethod
    def backward(ctx, dy, *_):
        x, valid, weight, mean, rstd, inv_n = ctx.saved_tensors
        B, T, C = x.shape
        with _fp32(dy):
            ones = x.new_ones(B)
            dy = dy.contiguous()
            sum_dy = (ones @ dy.view(B, T * C)).view(T, C)
            dx = dy * x  # scratch: its batch sums, then dx in the same memory
            sum_dy_x = (ones @ dx.view(B, T * C)).view(T, C)
            g_mean = -weight * rstd * sum_dy  # (T, C)
            g_var = -0.5 * weight * rstd**3 * (sum_dy_x - mean * sum_dy)

            def later(a):  # sum over t >= s, in fp64
                return a.double().flip(0).cumsum(0).flip(0)

            coef_x = (2 * later(g_var * inv_n)).to(x.dtype)  # (T, C)
            const = (later(g_mean * inv_n) - 2 * later(g_var * mean * inv_n)).to(x.dtype)
            torch.mul(dy, weight * rstd, out=dx)
            if valid is None:
                dx.addcmul_(x, coef_x).add_(const)
            else:
                stats = torch.addcmul(const, x, coef_x).masked_fill_(~valid[..., None], 0.0)
                dx.add_(stats)
            dweight = (rstd * (sum_dy_x - mean * sum_dy)).sum(0)
            dbias = sum_dy.sum(0)
        return dx, dweight, dbias, None, None, None


# -----------------------------------------------------------------------------
# Batch Layer Normalization (§6): official semantics plus the §6.4 adaptation to (B, T, C)


class BatchLayerNorm(nn.Module):
    """Batch Layer Normalization (Ziaee & Cano 2022), as the official Keras layer computes it (§6):

        y = weight * (w_F * xhat_F + w_B * xhat_B) / sqrt(C) + bias,
        w_F = 1/m - zeta,   w_B = 1 - 1/m - zeta,   m = batch_size (configured, not read from x)

    xhat_F: per token over C (LayerNorm without affine). xhat_B: per (t, c) over the B sequences
    (batch_axes="batch", official, causal in positions) or per c over all B x T tokens
    ("batch_time", our deviation: leaks). Both with eps inside the root.

    Population statistics (used in eval, switch by switch): the batch branch per (t, c) in rows of
    a (max_len, C) buffer ("batch") or per c ("batch_time"); the feature branch per position
    (max_len, 1) (deviation: the official keeps them per batch slot). Eval at length T uses the
    first T rows. stats="ema": PyTorch's momentum rule; stats="cumavg": the arithmetic mean since
    `reset_population_stats()` (official style, without the epochs). Batch variances get the
    Bessel factor n/(n-1), n = the elements reduced (B, or B*T), skipped when n = 1 so that m = 1
    stays finite (official: NaN). Feature variances get none: they estimate the per-token biased
    variance the current-token path uses (the official's m/(m-1) on them is a quirk, §6.2).

    The four inference switches are plain attributes, flipped by the evaluator; True = use the
    population statistic, False = recompute it from the current batch (batch branch) or token.
    Only the default (True, True, False, False) is causal and batch-independent in eval.
    """

    has_params = True
    STATS = ("ema", "cumavg")
    BATCH_AXES = ("batch", "batch_time")

    def __init__(
        self,
        dim: int,
        *,
        batch_size: int,
        eps: float = 1e-3,
        zeta: float = 1e-4,
        scale_by_sqrt_d: bool = True,
        batch_axes: str = "batch",
        stats: str = "ema",
        momentum: float = 0.1,
        max_len: int = 1024,
        batch_moving_mean: bool = True,
        batch_moving_var: bool = True,
        feature_moving_mean: bool = False,
        feature_moving_var: bool = False,
        sync: str = "local",
    ):
        super().__init__()
        _check_int("batch_size", batch_size, 1)
        _check_choice("sync", sync, SYNCS)
        self.sync = sync
        _check_float("eps", eps, 0.0, open_low=True)
        _check_float("zeta", zeta, 0.0)
        _check_bool("scale_by_sqrt_d", scale_by_sqrt_d)
        _check_choice("batch_axes", batch_axes, self.BATCH_AXES)
        _check_choice("stats", stats, self.STATS)
        _check_float("momentum", momentum, 0.0, 1.0)
        _check_int("max_len", max_len, 1)
        for key, value in [
            ("batch_moving_mean", batch_moving_mean),
            ("batch_moving_var", batch_moving_var),
            ("feature_moving_mean", feature_moving_mean),
            ("feature_moving_var", feature_moving_var),
        ]:
            _check_bool(key, value)
        self.batch_size, self.eps, self.zeta = batch_size, eps, zeta
        self.scale_by_sqrt_d, self.batch_axes, self.stats = scale_by_sqrt_d, batch_axes, stats
        self.momentum, self.max_len = momentum, max_len
        self.batch_moving_mean, self.batch_moving_var = batch_moving_mean, batch_moving_var
        self.feature_moving_mean, self.feature_moving_var = feature_moving_mean, feature_moving_var
        self.w_feature = 1.0 / batch_size - zeta
        self.w_batch = 1.0 - 1.0 / batch_size - zeta
        self.scale = 1.0 / math.sqrt(dim) if scale_by_sqrt_d else 1.0

        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        rows = max_len if batch_axes == "batch" else 1
        self.register_buffer("batch_mean", torch.zeros(rows, dim))
        self.register_buffer("batch_var", torch.ones(rows, dim))
        self.register_buffer("batch_count", torch.zeros(rows, dtype=torch.long))  # updates per row
        self.register_buffer("feature_mean", torch.zeros(max_len, 1))
        self.register_buffer("feature_var", torch.ones(max_len, 1))
        self.register_buffer("feature_count", torch.zeros(max_len, dtype=torch.long))
        self.causal_in_train = batch_axes == "batch"
        self.uses_batch_stats = True

    def reset_population_stats(self) -> None:
        """Back to the initial state: means 0, variances 1, counts 0 (cumavg restarts)."""
        for name in ("batch", "feature"):
            getattr(self, f"{name}_mean").zero_()
            getattr(self, f"{name}_var").fill_(1.0)
            getattr(self, f"{name}_count").zero_()

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        if T > self.max_len:
            raise ValueError(
                f"bln: sequence length {T} exceeds max_len={self.max_len} (the rows of the "
                "per-position population statistics); raise the max_len option"
            )
        with _fp32(x):
            xf = _upcast(x)
            if not self.training:
                y = self._eval_forward(xf, pad_mask)
            elif pad_mask is None and not _compiling() and self.sync == "local":
                y = self._train_forward_fast(xf)
            elif pad_mask is None:
                y = self._train_forward_plain(xf)
            else:
                y = self._train_forward_masked(xf, pad_mask)
        return y.to(x.dtype)

    def _mix(self, xf, mean_f, var_f, mean_b, var_b) -> torch.Tensor:
        """The BLN formula from given statistics (each broadcastable to (B, T, C))."""
        xhat_f = (xf - mean_f) * torch.rsqrt(var_f + self.eps)
        xhat_b = (xf - mean_b) * torch.rsqrt(var_b + self.eps)
        w = self.weight * self.scale
        y = torch.addcmul(self.bias, xhat_f, w * self.w_feature)
        return y.addcmul_(xhat_b, w * self.w_batch)

    def _batch_moments(self, xf, pad_mask, sync="local"):
        """Current-batch mean and biased var of the batch branch over valid tokens, and the counts.
        Shapes (1, T, C) and (1, T, 1) for "batch"; (1, 1, C) and (1, 1, 1) for "batch_time"."""
        dims = (0,) if self.batch_axes == "batch" else (0, 1)
        if pad_mask is None and (sync == "local" or not _distributed()):
            var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)
            n = xf.new_full(mean.shape[:-1] + (1,), math.prod([xf.shape[d] for d in dims]))
            return mean, var, n
        # from sums, all-reduced over the ranks for sync="global"
        pad = (
            xf.new_zeros(xf.shape[:2] + (1,), dtype=torch.bool)
            if pad_mask is None
            else pad_mask[..., None]
        )  # (B, T, 1)
        n = _group_sum((~pad).sum(dims, keepdim=True).to(xf.dtype), sync)
        mean = _group_sum(xf.masked_fill(pad, 0.0).sum(dims, keepdim=True), sync) / n.clamp_min(1)
        sq = (xf - mean).masked_fill(pad, 0.0).square().sum(dims, keepdim=True)
        var = _group_sum(sq, sync) / n.clamp_min(1)
        return mean, var, n

    @staticmethod
    def _feature_moments(xf):
        var, mean = torch.var_mean(xf, dim=-1, correction=0, keepdim=True)  # (B, T, 1) each
        return mean, var

    def _train_forward_fast(self, xf: torch.Tensor) -> torch.Tensor:
        B, T, C = xf.shape
        rows = B if self.batch_axes == "batch" else B * T  # the batch branch reduces over these
        y, mean_f, rstd_f, mean_b, var_b = _BLNFunction.apply(
            xf, self.weight, self.bias, self.w_feature * self.scale, self.w_batch * self.scale,
            self.eps, rows,
        )  # fmt: skip
        with torch.no_grad():
            var_f = (rstd_f.square().reciprocal() - self.eps).clamp_min(0)  # (B, T, 1) biased
            mean_b, var_b = mean_b.view(-1, C), var_b.view(-1, C)  # (T, C) or (1, C)
            self._update_batch_population(mean_b, var_b, xf.new_full((len(mean_b), 1), rows))
            self._update_feature_population(mean_f.mean(0), var_f.mean(0), xf.new_full((T, 1), B))
        return y

    def _train_forward_plain(self, xf: torch.Tensor) -> torch.Tensor:
        """`_train_forward_fast` in plain ops, for torch.compile: Inductor fuses both branches'
        reductions and the mix, which it cannot do through `_BLNFunction`."""
        B, T, C = xf.shape
        mean_f, var_f = self._feature_moments(xf)  # (B, T, 1)
        mean_b, var_b, n_b = self._batch_moments(xf, None, self.sync)  # (1, T, C) / (1, 1, C)
        y = self._mix(xf, mean_f, var_f, mean_b, var_b)
        with torch.no_grad():
            self._update_batch_population(mean_b[0], var_b[0], n_b[0])
            n_t = _group_sum(xf.new_full((T, 1), B), self.sync)  # sequences per position
            mean_ft = _group_sum(mean_f.sum(0), self.sync) / n_t  # (T, 1)
            var_ft = _group_sum(var_f.sum(0), self.sync) / n_t
            self._update_feature_population(mean_ft, var_ft, n_t)
        return y

    def _train_forward_masked(self, xf: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        mean_f, var_f = self._feature_moments(xf)
        mean_b, var_b, n_b = self._batch_moments(xf, pad_mask, self.sync)
        y = self._mix(xf, mean_f, var_f, mean_b, var_b)
        with torch.no_grad():
            self._update_batch_population(mean_b[0], var_b[0], n_b[0])
            pad = pad_mask[..., None]  # (B, T, 1)
            n_t = _group_sum((~pad).sum(0).to(xf.dtype), self.sync)  # (T, 1) valid sequences
            mean_ft = _group_sum(mean_f.masked_fill(pad, 0.0).sum(0), self.sync) / n_t.clamp_min(1)
            var_ft = _group_sum(var_f.masked_fill(pad, 0.0).sum(0), self.sync) / n_t.clamp_min(1)
            self._update_feature_population(mean_ft, var_ft, n_t)
        return y

    def _eval_forward(self, xf: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        T = xf.shape[1]
        mean_f = var_f = mean_b = var_b = None
        if not (self.feature_moving_mean and self.feature_moving_var):
            mean_f, var_f = self._feature_moments(xf)
        if not (self.batch_moving_mean and self.batch_moving_var):
            mean_b, var_b, _ = self._batch_moments(xf, pad_mask)
        rows = T if self.batch_axes == "batch" else 1
        if self.feature_moving_mean:
            mean_f = self.feature_mean[:T]  # (T, 1)
        if self.feature_moving_var:
            var_f = self.feature_var[:T]
        if self.batch_moving_mean:
            mean_b = self.batch_mean[:rows]  # (T, C) or (1, C)
        if self.batch_moving_var:
            var_b = self.batch_var[:rows]
        return self._mix(xf, mean_f, var_f, mean_b, var_b)

    def _update_batch_population(self, mean, var, n) -> None:
        """mean, var (rows, C) biased; n (rows, 1) elements reduced per row."""
        rows = mean.shape[0]
        unbiased = var * n / (n - 1).clamp_min(1)  # Bessel factor; n = 1 keeps the (zero) var
        buffers = self.batch_mean[:rows], self.batch_var[:rows], self.batch_count[:rows]
        self._update_rows(*buffers, mean, unbiased, n)

    def _update_feature_population(self, mean, var, n) -> None:
        """mean, var (T, 1): per-position averages of the per-token stats; n (T, 1) tokens."""
        T = mean.shape[0]
        buffers = self.feature_mean[:T], self.feature_var[:T], self.feature_count[:T]
        self._update_rows(*buffers, mean, var, n)

    def _update_rows(self, mean_buf, var_buf, count_buf, mean, var, n) -> None:
        # In place on buffer slices; rows with no valid token this step (n = 0) are left alone.
        seen = n > 0  # (rows, 1)
        if self.stats == "ema":
            rate = self.momentum
        else:  # cumavg: the k-th update of a row has weight 1/k -> arithmetic mean since reset
            rate = 1.0 / (count_buf + 1).to(mean.dtype).unsqueeze(1)
        mean_buf.copy_(torch.where(seen, torch.lerp(mean_buf, mean, rate), mean_buf))
        var_buf.copy_(torch.where(seen, torch.lerp(var_buf, var, rate), var_buf))
        count_buf.add_(seen.squeeze(1).long())

    def extra_repr(self) -> str:
        return (
            f"m={self.batch_size}, eps={self.eps}, zeta={self.zeta}, axes={self.batch_axes}, "
            f"stats={self.stats}, sqrt_d={self.scale_by_sqrt_d}, max_len={self.max_len}"
        )


class _BLNFunction(torch.autograd.Function):
    """BLN's train-mode forward without padding, with a hand-written backward: the two branches
    share passes over x and dy that autograd would repeat (and torch's BatchNorm kernels are slow
    for a (B, T*C) layout with a few rows on CPU). The feature branch is LayerNorm's fused kernel
    with weight w_f * weight and the bias; the batch branch reduces the 2-D view xb (rows, K) of
    x over its rows, where (rows, K) = (B, T*C) for "batch" and (B*T, C) for "batch_time":

        y = LN(x; w_f * weight, bias) + (w_b * weight) * (xb - mean_b) / sqrt(var_b + eps)

    Column means over the rows are matrix-vector products (one read, unlike a strided sum)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_f, w_b, eps, rows):
        B, T, C = x.shape
        k = B * T * C // rows
        avg = x.new_full((rows,), 1.0 / rows)  # row weights for column means
        y, mean_f, rstd_f = torch.native_layer_norm(x, [C], weight * w_f, bias, eps)
        xb = x.view(rows, k)
        mean_b = avg @ xb  # (K,)
        xc = xb - mean_b  # (rows, K), saved for backward
        var_b = avg @ xc.square()  # (K,) biased
        rstd_b = torch.rsqrt(var_b + eps)
        scale_b = (weight * w_b).repeat(k // C) * rstd_b  # (K,) per column
        y.view(rows, k).addcmul_(xc, scale_b)
        ctx.save_for_backward(x, weight, mean_f, rstd_f, xc, rstd_b, scale_b)
        ctx.w_f, ctx.w_b, ctx.rows = w_f, w_b, rows
        ctx.mark_non_differentiable(mean_f, rstd_f, mean_b, var_b)
        return y, mean_f, rstd_f, mean_b, var_b

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, mean_f, rstd_f, xc, rstd_b, scale_b = ctx.saved_tensors
        rows, (B, T, C) = ctx.rows, x.shape
        k = B * T * C // rows
        with _fp32(dy):
            dy = dy.contiguous()
            # feature branch: LayerNorm's backward; d(w_f * weight) = sum dy * xhat_f
            dx, dw_f, _ = torch.ops.aten.native_layer_norm_backward(
                dy, x, [C], mean_f, rstd_f, weight * ctx.w_f, None, [True, True, False]
            )
            # batch branch, per column: dx_b = scale_b * (dy - mean(dy) - xc * rstd_b^2 *
            # mean(dy * xc)), the BatchNorm backward over the rows
            avg = x.new_full((rows,), 1.0 / rows)
            dyb = dy.view(rows, k)
            mean_dy = avg @ dyb  # (K,)
            tmp = dyb * xc
            mean_dy_xc = avg @ tmp  # (K,)
            torch.addcmul(dyb, xc, -rstd_b.square() * mean_dy_xc, out=tmp)
            tmp.sub_(mean_dy)
            dx.view(rows, k).addcmul_(tmp, scale_b)
            # sum dy * xhat_b and sum dy per channel, from the column sums
            dw_b = (mean_dy_xc * rstd_b * rows).view(-1, C).sum(0)
            dbias = (mean_dy * rows).view(-1, C).sum(0)
        dweight = dw_f * ctx.w_f + dw_b * ctx.w_b
        return dx, dweight, dbias, None, None, None, None


# -----------------------------------------------------------------------------
# PowerNorm (§7), the official code's semantics


class _PowerNormFunction(torch.autograd.Function):
    """y = u * (weight * r_fwd) + bias with PowerNorm's approximate backward (§7.4):

        g = weight * dy (the gradient w.r.t. z = u * r_fwd),  gt = g - (1 - alpha_bkw) * e * z
        e <- e + mean_{all b,t}(gt * z)        (in place, with the old e in gt)
        du = gt * r_bwd,   dweight = sum dy * z,   dbias = sum dy

    r_fwd (C,) is what the forward divided by; r_bwd (C,) is 1/sqrt(q + eps) of the current batch
    ("batch", the code) or r_fwd ("running", the paper). No gradient flows to q, phi or r."""

    @staticmethod
    def forward(ctx, u, weight, bias, r_fwd, r_bwd, ema_gz, alpha_bkw, sum_z2):
        # u (B, T, C) fp32 group-scaled input; sum_z2 (C,) = sum over all B*T slots of z^2
        ctx.save_for_backward(u, weight, r_fwd, r_bwd, sum_z2)
        ctx.ema_gz, ctx.alpha_bkw = ema_gz, alpha_bkw  # e is mutated in backward: not "saved"
        return torch.addcmul(bias, u, weight * r_fwd)

    @staticmethod
    def backward(ctx, dy):
        u, weight, r_fwd, r_bwd, sum_z2 = ctx.saved_tensors
        e, beta = ctx.ema_gz, 1.0 - ctx.alpha_bkw
        n = u.shape[0] * u.shape[1]  # all slots, pads included (as the official code)
        with _fp32(dy):
            du = dy * u  # scratch: its column sums, then du in the same memory
            sum_dy_z = _column_sum(du) * r_fwd  # (C,) = dweight
            sum_dy = _column_sum(dy)  # (C,) = dbias
            e_old = e.clone()
            # mean(gt * z) = (weight * sum(dy * z) - beta * e * sum(z^2)) / n
            e.add_((weight * sum_dy_z - beta * e_old * sum_z2) / n)
            torch.mul(dy, weight * r_bwd, out=du)
            du.addcmul_(u, beta * e_old * r_fwd * r_bwd, value=-1.0)  # - beta * e * z * r_bwd
        return du, sum_dy_z, sum_dy, None, None, None, None, None


class _PowerNormFusedFunction(torch.autograd.Function):
    """`_PowerNormFunction` in plain ops, for torch.compile: Dynamo traces both directions into
    the graph and Inductor fuses them. e (the buffer ema_gz) is an input saved for backward, so
    AOTAutograd sees its in-place update there as a mutation of a graph input and writes it back
    (a tensor kept on ctx would be updated in a functional copy and lost). The update comes last:
    everything before it reads the old e."""

    @staticmethod
    def forward(ctx, u, weight, bias, r_fwd, r_bwd, ema_gz, alpha_bkw, sum_z2):
        ctx.save_for_backward(u, weight, r_fwd, r_bwd, sum_z2, ema_gz)
        ctx.alpha_bkw = alpha_bkw
        return torch.addcmul(bias, u, weight * r_fwd)

    @staticmethod
    def backward(ctx, dy):
        u, weight, r_fwd, r_bwd, sum_z2, e = ctx.saved_tensors
        r_bwd = r_fwd if r_bwd is None else r_bwd
        beta = 1.0 - ctx.alpha_bkw
        n = u.shape[0] * u.shape[1]  # all slots, pads included (as the official code)
        sum_dy_z = (dy * u).sum((0, 1)) * r_fwd  # (C,) = dweight
        sum_dy = dy.sum((0, 1))  # (C,) = dbias
        du = (dy * weight - beta * e * u * r_fwd) * r_bwd  # (g - beta * e * z) * r_bwd
        e.add_((weight * sum_dy_z - beta * e * sum_z2) / n)
        return du, sum_dy_z, sum_dy, None, None, None, None, None


class PowerNorm(nn.Module):
    """PowerNorm (Shen et al. 2020), the official code's semantics (§7):

    1. group scaling, per token: each of `groups` groups of C/groups channels is divided by
       sqrt(mean of its squares + 1e-5) (hard-coded eps, as the code): u;
    2. q = per-channel mean of u^2 over the valid tokens of the batch;
    3. z = u / sqrt(q + eps) during warm-up (k <= W), else u / sqrt(phi + eps) with phi from
       previous calls only (the value before this call's update);
    4. phi update: if k < W, first phi <- phi (k-1)/k + q/k; then always
       phi <- alpha_fwd phi + (1 - alpha_fwd) q;
    5. y = weight * z + bias, with the approximate backward of `_PowerNormFunction`.

    Eval: y = weight * u / sqrt(phi + eps) + bias; no buffer changes.

    Units: k counts TRAIN-MODE FORWARD CALLS (buffer `iters`, incremented once per call, i.e. once
    per micro-batch), so with gradient accumulation one optimizer step is `accum_steps` calls.
    The warm-up is given in optimizer steps and converted: W = warmup_steps * accum_steps calls.
    (The fairseq wiring passes the LR warm-up; the official default is 10000 calls.) Warm-up
    uses current-batch statistics over B x T in the forward, so it LEAKS; causal_in_train is
    therefore warmup_steps == 0, and `in_warmup` tells whether the next call is still in it.
    Repeated forwards (activation checkpointing) would advance phi and iters twice.

    backward_scale: "batch" divides the backward by the current-batch q even after warm-up (the
    official code, default); "running" divides it by what the forward divided by (phi before the
    update after warm-up; q during warm-up, where the two coincide), as the paper describes.
    """

    has_params = True
    BACKWARD_SCALES = ("batch", "running")
    GROUP_EPS = 1e-5

    def __init__(
        self,
        dim: int,
        *,
        groups: int = 1,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        warmup_steps: int = 0,
        accum_steps: int = 1,
        backward_scale: str = "batch",
    ):
        super().__init__()
        _check_int("groups", groups, 1)
        if dim % groups:
            raise ValueError(f"groups={groups!r}: must divide the norm width dim={dim}")
        _check_float("eps", eps, 0.0, open_low=True)
        _check_float("alpha_fwd", alpha_fwd, 0.0, 1.0)
        _check_float("alpha_bkw", alpha_bkw, 0.0, 1.0)
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("accum_steps", accum_steps, 1)
        _check_choice("backward_scale", backward_scale, self.BACKWARD_SCALES)
        self.groups, self.eps = groups, eps
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.warmup_steps, self.accum_steps = warmup_steps, accum_steps
        self.warmup_calls = warmup_steps * accum_steps  # W, in train-mode forward calls
        self.backward_scale = backward_scale
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_phi", torch.ones(dim))
        self.register_buffer("ema_gz", torch.zeros(dim))
        self.register_buffer("iters", torch.tensor(0, dtype=torch.long))
        self.causal_in_train = warmup_steps == 0
        self.uses_batch_stats = True

    @property
    def in_warmup(self) -> bool:
        """Whether the next train-mode forward call divides by current-batch statistics."""
        return int(self.iters) < self.warmup_calls

    def group_scale(self, xf: torch.Tensor) -> torch.Tensor:
        B, T, C = xf.shape
        u = _rms_norm(xf.view(B, T, self.groups, C // self.groups), None, self.GROUP_EPS)
        return u.view(B, T, C)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        with _fp32(x):
            u = self.group_scale(_upcast(x))  # (B, T, C)
            if self.training:
                y = self._train_forward(u, pad_mask)
            else:
                y = torch.addcmul(
                    self.bias, u, self.weight * torch.rsqrt(self.running_phi + self.eps)
                )
        return y.to(x.dtype)

    def _train_forward(self, u: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            # this call's number, 1-based; read through _snapshot, like phi below, because the
            # backward graph must not recompute r_fwd from the updated buffers
            k = _snapshot(self.iters).to(u.dtype) + 1
            self.iters.add_(1)
            u2 = u.square()
            sum_u2 = _column_sum(u2)  # (C,) over all slots
            if pad_mask is None:
                q = sum_u2 / (u.shape[0] * u.shape[1])
            else:
                n = (~pad_mask).sum().clamp_min(1)
                q = _column_sum(u2.masked_fill_(pad_mask[..., None], 0.0)) / n
            phi = _snapshot(self.running_phi)  # before this call's update
            r_q = torch.rsqrt(q + self.eps)
            # tensor-valued branch on k (no host sync, no recompiles)
            r_fwd = torch.where(k <= self.warmup_calls, r_q, torch.rsqrt(phi + self.eps))
            r_bwd = r_q if self.backward_scale == "batch" else r_fwd
            cumavg = torch.where(k < self.warmup_calls, phi * (k - 1) / k + q / k, phi)
            self.running_phi.copy_(torch.lerp(q, cumavg, self.alpha_fwd))  # a*cumavg + (1-a)*q
            sum_z2 = sum_u2 * r_fwd.square()
        if _compiling():  # r_bwd None = r_fwd (Dynamo rejects one tensor passed twice)
            r_bwd = None if r_bwd is r_fwd else r_bwd
            fn = _PowerNormFusedFunction
        else:
            fn = _PowerNormFunction
        return fn.apply(
            u, self.weight, self.bias, r_fwd, r_bwd, self.ema_gz, self.alpha_bkw, sum_z2
        )

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, eps={self.eps}, warmup_calls={self.warmup_calls}, "
            f"backward_scale={self.backward_scale}"
        )


# -----------------------------------------------------------------------------
# the registry: key = conf/norm/<key>.yaml stem = MLflow norm.name

NORMS: dict[str, type[nn.Module]] = {
    "layernorm": LayerNorm,
    "rmsnorm": RMSNorm,
    "identity": Identity,
    "batchnorm": BatchNorm,
    "bln": BatchLayerNorm,
    "powernorm": PowerNorm,
    "causal_batchnorm": CausalBatchNorm,
}


def build_norm(name: str, dim: int, **options) -> nn.Module:
    """A fresh norm module of width `dim`; options are the class's keyword arguments."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid choices: {', '.join(sorted(NORMS))}")
    cls = NORMS[name]
    params = {
        p.name: p for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY
    }
    valid = ", ".join(params) or "none"
    for key in options:
        if key not in params:
            raise ValueError(f"unknown option {key!r} for norm {name!r}; valid options: {valid}")
    for key, p in params.items():
        if p.default is p.empty and key not in options:
            raise ValueError(f"norm {name!r} needs option {key!r}; valid options: {valid}")
    _check_int("dim", dim, 1)
    return cls(dim, **options)
