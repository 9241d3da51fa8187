"""Batch Layer Normalization (NORMS.md §6): the official semantics plus the §6.4 adaptation to
(B, T, C). Section numbers refer to `research/NORMS.md`."""

import math

import torch
import torch.nn as nn

from bln_sweeps.norms.options import check_bool, check_choice, check_float, check_int
from bln_sweeps.norms.statistics import (
    SYNCS,
    compiling,
    fp32,
    group_sum,
    is_distributed,
    upcast,
)


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
        check_int("batch_size", batch_size, 1)
        check_choice("sync", sync, SYNCS)
        self.sync = sync
        check_float("eps", eps, 0.0, open_low=True)
        check_float("zeta", zeta, 0.0)
        check_bool("scale_by_sqrt_d", scale_by_sqrt_d)
        check_choice("batch_axes", batch_axes, self.BATCH_AXES)
        check_choice("stats", stats, self.STATS)
        check_float("momentum", momentum, 0.0, 1.0)
        check_int("max_len", max_len, 1)
        for key, value in [
            ("batch_moving_mean", batch_moving_mean),
            ("batch_moving_var", batch_moving_var),
            ("feature_moving_mean", feature_moving_mean),
            ("feature_moving_var", feature_moving_var),
        ]:
            check_bool(key, value)
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
        with fp32(x):
            xf = upcast(x)
            if not self.training:
                y = self._eval_forward(xf, pad_mask)
            elif pad_mask is None and not compiling() and self.sync == "local":
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
        if pad_mask is None and (sync == "local" or not is_distributed()):
            var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)
            n = xf.new_full(mean.shape[:-1] + (1,), math.prod([xf.shape[d] for d in dims]))
            return mean, var, n
        # from sums, all-reduced over the ranks for sync="global"
        pad = (
            xf.new_zeros(xf.shape[:2] + (1,), dtype=torch.bool)
            if pad_mask is None
            else pad_mask[..., None]
        )  # (B, T, 1)
        n = group_sum((~pad).sum(dims, keepdim=True).to(xf.dtype), sync)
        mean = group_sum(xf.masked_fill(pad, 0.0).sum(dims, keepdim=True), sync) / n.clamp_min(1)
        sq = (xf - mean).masked_fill(pad, 0.0).square().sum(dims, keepdim=True)
        var = group_sum(sq, sync) / n.clamp_min(1)
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
            n_t = group_sum(xf.new_full((T, 1), B), self.sync)  # sequences per position
            mean_ft = group_sum(mean_f.sum(0), self.sync) / n_t  # (T, 1)
            var_ft = group_sum(var_f.sum(0), self.sync) / n_t
            self._update_feature_population(mean_ft, var_ft, n_t)
        return y

    def _train_forward_masked(self, xf: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        mean_f, var_f = self._feature_moments(xf)
        mean_b, var_b, n_b = self._batch_moments(xf, pad_mask, self.sync)
        y = self._mix(xf, mean_f, var_f, mean_b, var_b)
        with torch.no_grad():
            self._update_batch_population(mean_b[0], var_b[0], n_b[0])
            pad = pad_mask[..., None]  # (B, T, 1)
            n_t = group_sum((~pad).sum(0).to(xf.dtype), self.sync)  # (T, 1) valid sequences
            mean_ft = group_sum(mean_f.masked_fill(pad, 0.0).sum(0), self.sync) / n_t.clamp_min(1)
            var_ft = group_sum(var_f.masked_fill(pad, 0.0).sum(0), self.sync) / n_t.clamp_min(1)
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
        with fp32(dy):
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
