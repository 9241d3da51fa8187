"""GPT-2 with a pluggable normalization layer, shaped after nanoGPT's model.py.

Pre-norm blocks, GPT-2 weight names (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, `mlp.c_proj`, `ln_f`),
causal attention through `scaled_dot_product_attention`, the LM head tied to the token embedding,
and GPT-2's init. The only departure is where the norms come from: the model takes a
`norm_factory(site)` and never sees the registry or Hydra, so BLN in the blocks and LayerNorm at
`ln_f` is the caller's choice. Every norm takes `(x, pad_mask)`; batch-statistic norms need the
mask to keep padding out of their statistics.

Two switches a reviewer asks for, both off by default (GPT-2 as published): `qk_norm` normalises
q and k per head before the attention product, and `norm_placement="peri"` (Peri-LN) also
normalises each sub-layer's output before the residual add.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bln_sweeps.config import NORM_PLACEMENTS, QK_NORMS

# site name -> a fresh norm module of width n_embd; the sites are config.NORM_SITES: "ln_1", "ln_2"
# (per block), "ln_f", and with norm_placement="peri" "ln_1_out", "ln_2_out" (per block)
NormFactory = Callable[[str], nn.Module]


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # GPT-2 BPE; nanoGPT pads to 50304 for speed, we keep the exact count
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers (and in LayerNorm, via the norm options)
    qk_norm: str = "none"  # "rmsnorm" | "layernorm": normalise q and k per head before SDPA
    norm_placement: str = "pre"  # "pre": x + F(N(x)) (GPT-2); "peri": x + N_out(F(N_in(x)))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # query, key, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.dropout = config.dropout
        # QK-norm (Dehghani et al. 2023; Wortsman et al. 2023): q and k normalised over the head
        # dimension, one gain of width hs shared by the heads, so attention logits q.k/sqrt(hs)
        # stay bounded whatever the growth of the c_attn weights. Per token: causal.
        if config.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={config.qk_norm!r}: valid choices: {', '.join(QK_NORMS)}")
        self.q_norm = self.k_norm = None
        if config.qk_norm != "none":
            from bln_sweeps.norms import build_norm

            hs = config.n_embd // config.n_head
            opts = {"bias": False} if config.qk_norm == "layernorm" else {}
            self.q_norm = build_norm(config.qk_norm, hs, **opts)
            self.k_norm = build_norm(config.qk_norm, hs, **opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:  # over the last dim, hs: per head and token
            q, k = self.q_norm(q), self.k_norm(k)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return F.dropout(self.c_proj(y), p, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, norm_factory: NormFactory):
        super().__init__()
        self.ln_1 = norm_factory("ln_1")
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_factory("ln_2")
        self.mlp = MLP(config)
        # Peri-LN (Kim et al., ICML 2025): each sub-layer's output is normalised too before it
        # joins the residual stream, which bounds what a block can add to it. Pre-norm models
        # have no such modules, so their state_dict keys are GPT-2's.
        if config.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(
                f"norm_placement={config.norm_placement!r}: valid choices: "
                f"{', '.join(NORM_PLACEMENTS)}"
            )
        self.peri = config.norm_placement == "peri"
        if self.peri:
            self.ln_1_out = norm_factory("ln_1_out")
            self.ln_2_out = norm_factory("ln_2_out")
        self.activation_checkpointing = False  # set by GPT.set_activation_checkpointing

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.peri:  # x + N_out(F(N_in(x)))
            x = x + self.ln_1_out(self.sublayer(self.attn, self.ln_1(x, pad_mask)), pad_mask)
            x = x + self.ln_2_out(self.sublayer(self.mlp, self.ln_2(x, pad_mask)), pad_mask)
            return x
        x = x + self.sublayer(self.attn, self.ln_1(x, pad_mask))
        x = x + self.sublayer(self.mlp, self.ln_2(x, pad_mask))
        return x

    def sublayer(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        # Activation checkpointing keeps only the sublayer's input h (B, T, C) and recomputes its
        # insides (qkv, attention output, the 4C-wide MLP activations) during backward. The norms
        # stay outside it: a batch-statistic norm run twice would update its running statistics
        # (and PowerNorm its call counter and phi) twice, and PowerNorm's recomputed output would
        # use the updated phi.
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, use_reentrant=False)
        return layer(h)


def layernorm_factory(config: GPTConfig) -> NormFactory:
    """GPT-2's own norm everywhere: LayerNorm, eps 1e-5, bias when the model has biases."""
    from bln_sweeps.norms import build_norm

    return lambda site: build_norm("layernorm", config.n_embd, bias=config.bias)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, norm_factory: NormFactory | None = None):
        super().__init__()
        self.config = config
        norm_factory = norm_factory or layernorm_factory(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, norm_factory) for _ in range(config.n_layer)]),
                ln_f=norm_factory("ln_f"),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer) because each
        # block adds two of them to the residual stream. Norm modules keep their own init.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's attention and MLP in backward instead of storing them: at seq
        4096 their activations dominate memory (~17 x (B, T, C) per block)."""
        for block in self.transformer.h:
            block.activation_checkpointing = enabled

    def norm_modules(self) -> list[tuple[str, nn.Module]]:
        """The norm sites from the factory, by their state_dict prefix: 2 * n_layer + 1 with
        pre-norm, 4 * n_layer + 1 with Peri-LN. QK-norms are not among them: they are a fixed
        per-token norm inside attention, not the variant under comparison."""
        sites = []
        for i, block in enumerate(self.transformer.h):
            names = ("ln_1", "ln_2", "ln_1_out", "ln_2_out") if block.peri else ("ln_1", "ln_2")
            sites += [(f"transformer.h.{i}.{n}", getattr(block, n)) for n in names]
        return sites + [("transformer.ln_f", self.transformer.ln_f)]

    def num_params(self) -> int:
        # tied weights are one Parameter, so parameters() counts them once
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) token ids; pad_mask: (B, T) bool, True = padding.

        Returns logits (B, T, vocab) and the mean cross-entropy over non-pad targets (or None).
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds model.block_size {self.config.block_size}"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(
            self.transformer.wte(idx) + self.transformer.wpe(pos)
        )  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, pad_mask)
        x = self.transformer.ln_f(x, pad_mask)
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return logits, None
        if pad_mask is not None:
            targets = targets.masked_fill(pad_mask, -1)
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
        )
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices and embeddings only (>= 2-D); never on norm gains/biases,
        Linear biases or any other 1-D tensor, as in nanoGPT and llm.c."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B as in nanoGPT's MFU:
        6N for the matmuls plus 12 * L * C * T for attention."""
        n = self.num_params() - self.transformer.wpe.weight.numel()
        cfg = self.config
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len
