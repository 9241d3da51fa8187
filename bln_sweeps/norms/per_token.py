"""Per-token norms (NORMS.md §3 LayerNorm, §4 RMSNorm, §10 DyT, and the identity control):
causal and batch-independent in both modes. Also the RMS scaling that PowerNorm's group
scaling reuses. Section numbers refer to `research/NORMS.md`."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from bln_sweeps.norms.options import check_bool, check_float
from bln_sweeps.norms.statistics import compiling, fp32, upcast

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
        with fp32(dy):
            # LayerNorm's backward with mean 0: r * (g - mean(g) - xhat * mean(g * xhat)), where
            # g = dy * weight and xhat = x * r. RMSNorm's lacks the "- mean(g)": add r * mean(g).
            mask = [True, weight is not None and ctx.needs_input_grad[1], False]
            dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
                dy, x, [d], torch.zeros_like(r), r, weight, None, mask
            )
            g_mean = (dy @ weight if weight is not None else dy.sum(-1)).unsqueeze(-1) / d
            dx.add_(r * g_mean)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if compiling():  # one reduction and one pointwise kernel each way once fused
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
        check_float("eps", eps, 0.0, open_low=True)
        check_bool("bias", bias)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_parameter("bias", nn.Parameter(torch.zeros(dim)) if bias else None)
        self.causal_in_train = True
        self.uses_batch_stats = False

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        with fp32(x):
            y = F.layer_norm(upcast(x), (x.shape[-1],), self.weight, self.bias, self.eps)
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm (§4): x / sqrt(mean_c(x^2) + eps) * weight, no centring, no bias. eps is explicit
    and inside the root (torch.nn.RMSNorm's convention), never the dtype-dependent default."""

    has_params = True

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        check_float("eps", eps, 0.0, open_low=True)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.causal_in_train = True
        self.uses_batch_stats = False

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        with fp32(x):
            y = rms_norm(upcast(x), self.weight, self.eps)
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


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al., "Transformers without Normalization", CVPR 2025; NORMS.md §10):
    y = weight * tanh(alpha * x) + bias, elementwise, so no statistics at all. alpha is one learned
    scalar per layer (shape (1,), as the official code), weight = 1 and bias = 0 at init.
    `alpha_init` is 0.5 in the paper for non-LLM models; LLMs want different values per site
    (attention input, MLP input, final), which the trainer passes site by site (norm.sites)."""

    has_params = True

    def __init__(self, dim: int, *, alpha_init: float = 0.5, bias: bool = True):
        super().__init__()
        check_float("alpha_init", alpha_init, 0.0, open_low=True)
        check_bool("bias", bias)
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_parameter("bias", nn.Parameter(torch.zeros(dim)) if bias else None)
        self.causal_in_train = True
        self.uses_batch_stats = False

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        with fp32(x):
            y = torch.tanh(self.alpha * upcast(x)) * self.weight
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"alpha_init={self.alpha_init}"
