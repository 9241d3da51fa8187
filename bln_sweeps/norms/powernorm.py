"""PowerNorm (NORMS.md §7), the official code's semantics. Section numbers refer to
`research/NORMS.md`."""

import torch
import torch.nn as nn

from bln_sweeps.norms.options import check_choice, check_float, check_int
from bln_sweeps.norms.per_token import rms_norm
from bln_sweeps.norms.statistics import (
    SYNCS,
    column_sum,
    compiling,
    fp32,
    rank_sums,
    snapshot,
    upcast,
)


class _PowerNormFunction(torch.autograd.Function):
    """y = u * (weight * r_fwd) + bias with PowerNorm's approximate backward (§7.4):

        g = weight * dy (the gradient w.r.t. z = u * r_fwd),  gt = g - (1 - alpha_bkw) * e * z
        e <- e + mean_{all b,t}(gt * z)        (in place, with the old e in gt)
        du = gt * r_bwd,   dweight = sum dy * z,   dbias = sum dy

    r_fwd (C,) is what the forward divided by; r_bwd (C,) is 1/sqrt(q + eps) of the current batch
    ("batch", the code) or r_fwd ("running", the paper). No gradient flows to q, phi or r.

    sync="global": the batch is every rank's micro-batch, as if one process held it all. The
    forward's sum_z2 (C,) and slot count n are already summed over the ranks; the backward sums
    sum(dy * z) (C,) over the ranks for the e update only, so e (and with it du) is the same on
    every rank and equals the single-process one. dweight and dbias stay this rank's sums: DDP
    adds them up over the ranks (summing global sums there would count every rank N times)."""

    @staticmethod
    def forward(ctx, u, weight, bias, r_fwd, r_bwd, ema_gz, alpha_bkw, sum_z2, n, sync):
        # u (B, T, C) fp32 group-scaled input; sum_z2 (C,) = sum over all B*T slots of z^2, and
        # n their number (an int, or a 0-d tensor when summed over the ranks)
        ctx.save_for_backward(u, weight, r_fwd, r_bwd, sum_z2)
        ctx.ema_gz, ctx.alpha_bkw = ema_gz, alpha_bkw  # e is mutated in backward: not "saved"
        ctx.n, ctx.sync = n, sync
        return torch.addcmul(bias, u, weight * r_fwd)

    @staticmethod
    def backward(ctx, dy):
        u, weight, r_fwd, r_bwd, sum_z2 = ctx.saved_tensors
        e, beta, n = ctx.ema_gz, 1.0 - ctx.alpha_bkw, ctx.n  # n: all slots, pads included
        with fp32(dy):
            du = dy * u  # scratch: its column sums, then du in the same memory
            sum_dy_z = column_sum(du) * r_fwd  # (C,) = dweight
            sum_dy = column_sum(dy)  # (C,) = dbias
            e_old = e.clone()
            (batch_dy_z,) = rank_sums(sum_dy_z, sync=ctx.sync)  # (C,) over the whole batch
            # mean(gt * z) = (weight * sum(dy * z) - beta * e * sum(z^2)) / n
            e.add_((weight * batch_dy_z - beta * e_old * sum_z2) / n)
            torch.mul(dy, weight * r_bwd, out=du)
            du.addcmul_(u, beta * e_old * r_fwd * r_bwd, value=-1.0)  # - beta * e * z * r_bwd
        return du, sum_dy_z, sum_dy, None, None, None, None, None, None, None


class _PowerNormFusedFunction(torch.autograd.Function):
    """`_PowerNormFunction` in plain ops, for torch.compile: Dynamo traces both directions into
    the graph and Inductor fuses them. e (the buffer ema_gz) is an input saved for backward, so
    AOTAutograd sees its in-place update there as a mutation of a graph input and writes it back
    (a tensor kept on ctx would be updated in a functional copy and lost). The update comes last:
    everything before it reads the old e."""

    @staticmethod
    def forward(ctx, u, weight, bias, r_fwd, r_bwd, ema_gz, alpha_bkw, sum_z2, n, sync):
        ctx.save_for_backward(u, weight, r_fwd, r_bwd, sum_z2, ema_gz)
        ctx.alpha_bkw, ctx.n, ctx.sync = alpha_bkw, n, sync
        return torch.addcmul(bias, u, weight * r_fwd)

    @staticmethod
    def backward(ctx, dy):
        u, weight, r_fwd, r_bwd, sum_z2, e = ctx.saved_tensors
        r_bwd = r_fwd if r_bwd is None else r_bwd
        beta, n = 1.0 - ctx.alpha_bkw, ctx.n  # n: all slots, pads included
        sum_dy_z = (dy * u).sum((0, 1)) * r_fwd  # (C,) = dweight
        sum_dy = dy.sum((0, 1))  # (C,) = dbias
        du = (dy * weight - beta * e * u * r_fwd) * r_bwd  # (g - beta * e * z) * r_bwd
        (batch_dy_z,) = rank_sums(sum_dy_z, sync=ctx.sync)  # (C,) over the whole batch
        e.add_((weight * batch_dy_z - beta * e * sum_z2) / n)
        return du, sum_dy_z, sum_dy, None, None, None, None, None, None, None


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

    sync: "local" takes q and the backward's means over this rank's micro-batch; "global" over
    every rank's (one all-reduce of the forward's sums, one of the backward's sum(dy * z)), so N
    ranks behave as one process holding the global batch: the same outputs, input gradients, phi
    and e on every rank (see `_PowerNormFunction` for the backward).
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
        sync: str = "local",
    ):
        super().__init__()
        check_int("groups", groups, 1)
        if dim % groups:
            raise ValueError(f"groups={groups!r}: must divide the norm width dim={dim}")
        check_float("eps", eps, 0.0, open_low=True)
        check_float("alpha_fwd", alpha_fwd, 0.0, 1.0)
        check_float("alpha_bkw", alpha_bkw, 0.0, 1.0)
        check_int("warmup_steps", warmup_steps, 0)
        check_int("accum_steps", accum_steps, 1)
        check_choice("backward_scale", backward_scale, self.BACKWARD_SCALES)
        check_choice("sync", sync, SYNCS)
        self.sync = sync
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
        u = rms_norm(xf.view(B, T, self.groups, C // self.groups), None, self.GROUP_EPS)
        return u.view(B, T, C)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        with fp32(x):
            u = self.group_scale(upcast(x))  # (B, T, C)
            if self.training:
                y = self._train_forward(u, pad_mask)
            else:
                y = torch.addcmul(
                    self.bias, u, self.weight * torch.rsqrt(self.running_phi + self.eps)
                )
        return y.to(x.dtype)

    def _train_forward(self, u: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            # this call's number, 1-based; read through snapshot, like phi below, because the
            # backward graph must not recompute r_fwd from the updated buffers
            k = snapshot(self.iters).to(u.dtype) + 1
            self.iters.add_(1)
            u2 = u.square()
            sum_u2 = column_sum(u2)  # (C,) over all slots
            n = u.shape[0] * u.shape[1]  # all slots, pads included (the backward's means)
            if self.sync == "global":  # the whole batch: sums and counts over the ranks
                q, sum_u2, n = self._global_moments(u2, sum_u2, n, pad_mask)
            elif pad_mask is None:
                q = sum_u2 / n
            else:
                n_valid = (~pad_mask).sum().clamp_min(1)
                q = column_sum(u2.masked_fill_(pad_mask[..., None], 0.0)) / n_valid
            phi = snapshot(self.running_phi)  # before this call's update
            r_q = torch.rsqrt(q + self.eps)
            # tensor-valued branch on k (no host sync, no recompiles)
            r_fwd = torch.where(k <= self.warmup_calls, r_q, torch.rsqrt(phi + self.eps))
            r_bwd = r_q if self.backward_scale == "batch" else r_fwd
            cumavg = torch.where(k < self.warmup_calls, phi * (k - 1) / k + q / k, phi)
            self.running_phi.copy_(torch.lerp(q, cumavg, self.alpha_fwd))  # a*cumavg + (1-a)*q
            sum_z2 = sum_u2 * r_fwd.square()
        if compiling():  # r_bwd None = r_fwd (Dynamo rejects one tensor passed twice)
            r_bwd = None if r_bwd is r_fwd else r_bwd
            fn = _PowerNormFusedFunction
        else:
            fn = _PowerNormFunction
        return fn.apply(
            u,
            self.weight,
            self.bias,
            r_fwd,
            r_bwd,
            self.ema_gz,
            self.alpha_bkw,
            sum_z2,
            n,
            self.sync,
        )

    @staticmethod
    def _global_moments(u2, sum_u2, n, pad_mask):
        """q (C,), sum_u2 (C,) over all slots and the slot count (0-d), all over every rank's
        micro-batch, from one all-reduce. u2 (B, T, C) is overwritten (pads zeroed)."""
        if pad_mask is None:
            valid_u2, n_valid = sum_u2, u2.new_tensor(float(n))
        else:
            valid_u2 = column_sum(u2.masked_fill_(pad_mask[..., None], 0.0))
            n_valid = (~pad_mask).sum().to(u2.dtype)
        slots = u2.new_tensor(float(n))
        sums = rank_sums(valid_u2, sum_u2, n_valid, slots, sync="global")
        valid_u2, sum_u2, n_valid, slots = sums
        return valid_u2 / n_valid.clamp_min(1), sum_u2, slots

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, eps={self.eps}, warmup_calls={self.warmup_calls}, "
            f"backward_scale={self.backward_scale}"
        )
