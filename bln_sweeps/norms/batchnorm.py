"""BatchNorm over all valid B x T tokens per channel (NORMS.md §5) and our causal variant
(§8.5). Section numbers refer to `research/NORMS.md`."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from bln_sweeps.norms.options import check_choice, check_float
from bln_sweeps.norms.statistics import (
    SYNCS,
    compiling,
    fp32,
    group_sum,
    rank_sums,
    snapshot,
    upcast,
)


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
        check_float("eps", eps, 0.0, open_low=True)
        check_float("momentum", momentum, 0.0, 1.0)
        check_choice("sync", sync, SYNCS)
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
        with fp32(x):
            xf = upcast(x)
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
        if self.sync == "global" or (pad_mask is not None and compiling()):
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
        n = group_sum(valid.sum(), self.sync)  # valid tokens, over the ranks for "global"
        mean = group_sum((xf * valid).sum((0, 1)), self.sync) / n.clamp_min(1)  # (C,)
        sq = ((xf - mean) * valid).square().sum((0, 1))
        var = group_sum(sq, self.sync) / n.clamp_min(1)  # (C,) biased
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
    the statistic at t = 0 is a single token (variance 0): finite, just uninformative.

    sync="global": the per-position batch sums (T, C) and counts (T, 1) are summed over the ranks
    before the cumulative sums, so position t pools positions <= t of every rank's sequences
    (still causal in positions); the backward sums its per-position batch sums likewise."""

    def __init__(self, dim: int, *, eps: float = 1e-5, momentum: float = 0.1, sync: str = "local"):
        super().__init__(dim, eps=eps, momentum=momentum, sync=sync)
        self.causal_in_train = True

    def _train_forward(self, xf: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        # The running mean (from earlier steps: a constant here) shifts x before the sums of
        # squares, so that E[x^2] - E[x]^2 does not cancel catastrophically.
        shift = snapshot(self.running_mean)
        valid = None if pad_mask is None else ~pad_mask
        y, mean, var, n = _CausalBatchNormFunction.apply(
            xf, self.weight, self.bias, shift, valid, self.eps, self.sync
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
    with g_mean_t = dL/dmean_t, g_var_t = dL/dvar_t: reverse cumulative sums over t.

    sync="global": the sums over b run over every rank's sequences: one all-reduce of (s1, s2,
    count) in the forward and one of (sum dy, sum dy*x) in the backward, so g_mean, g_var and dx
    are the single-process ones. dweight and dbias come from this rank's sums (DDP adds them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, shift, valid, eps, sync):
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
        s1, s2, count = rank_sums(s1, s2, count, sync=sync)  # over every rank's sequences
        n = count.double().cumsum(0)  # (T, 1) valid tokens at positions <= t
        inv_n = torch.where(n > 0, 1.0 / n.clamp_min(1), 0.0)  # no valid token yet: no stats
        mean_s = s1.double().cumsum(0) * inv_n  # (T, C), of the shifted x; fp64 running sums
        var = (s2.double().cumsum(0) * inv_n - mean_s.square()).clamp_min(0)  # biased
        mean = (mean_s + shift).to(x.dtype)
        rstd = torch.rsqrt(var.to(x.dtype) + eps)
        scale = weight * rstd  # (T, C)
        y = torch.addcmul(bias - scale * mean, x, scale)
        ctx.save_for_backward(x, valid, weight, mean, rstd, inv_n)
        ctx.sync = sync
        last = (mean[-1].clone(), var[-1].to(x.dtype), n[-1].to(x.dtype))  # the whole batch
        ctx.mark_non_differentiable(*last)
        return y, *last

    @staticmethod
    def backward(ctx, dy, *_):
        x, valid, weight, mean, rstd, inv_n = ctx.saved_tensors
        B, T, C = x.shape
        with fp32(dy):
            ones = x.new_ones(B)
            dy = dy.contiguous()
            sum_dy = (ones @ dy.view(B, T * C)).view(T, C)
            dx = dy * x  # scratch: its batch sums, then dx in the same memory
            sum_dy_x = (ones @ dx.view(B, T * C)).view(T, C)
            # the means and variances pooled every rank's sequences: so do their gradients
            all_dy, all_dy_x = rank_sums(sum_dy, sum_dy_x, sync=ctx.sync)  # (T, C) each
            g_mean = -weight * rstd * all_dy  # (T, C)
            g_var = -0.5 * weight * rstd**3 * (all_dy_x - mean * all_dy)

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
        return dx, dweight, dbias, None, None, None, None
