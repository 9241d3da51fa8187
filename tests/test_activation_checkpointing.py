"""`train.activation_checkpointing`: the same gradients and buffer updates for less memory, and
the GPT-2 124M step at seq 4096 on CPU."""

import copy
import math

import pytest
import torch

from bln_sweeps.build import flavour
from bln_sweeps.model import GPT
from bln_sweeps.norms import build_norm
from bln_sweeps.train import run


@pytest.mark.parametrize(
    "key,options",
    [("layernorm", {}), ("bln", {"batch_size": 4, "max_len": 32}), ("powernorm", {"groups": 4})],
)
def test_checkpointing_gives_the_same_gradients_and_buffers(key, options):
    torch.manual_seed(0)
    config = flavour("tiny", block_size=32, dropout=0.1)  # dropout: the RNG is replayed too
    plain = GPT(config, lambda site: build_norm(key, config.n_embd, **options)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_activation_checkpointing(True)
    idx = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    for model in (plain, ckpt):
        torch.manual_seed(2)
        model(idx, idx)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    # the norms ran once per step: running statistics and PowerNorm's call counter match
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_checkpointing_keeps_less_for_backward():
    """Bytes saved for backward, counted with saved-tensor hooks: the block insides go."""
    config = flavour("tiny", block_size=64)
    model = GPT(config).train()
    idx = torch.zeros(2, 64, dtype=torch.long)

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
        return total

    full = saved_bytes()
    model.set_activation_checkpointing(True)
    assert saved_bytes() < 0.6 * full


@pytest.mark.slow  # one GPT-2 124M step on 4096 tokens, eval included: 1-4 min on 2 cores
def test_gpt2_124m_step_at_seq_4096_runs_on_cpu(make_cfg):
    cfg = make_cfg(
        "model=gpt2_124m",
        "seq=s4096",
        "batch=b1",
        "norm=bln",
        "train.steps=1",
        "eval.tokens=4096",  # one window per held-out split
        "train.activation_checkpointing=true",
        "data.n_train_tokens=20000",
        "data.n_val_tokens=8200",
        tracking=False,
    )
    result = run(cfg)
    assert result["status"] == "finished" and math.isfinite(result["val/loss"])
