"""Training throughput, measured side by side in one process:

1. our GPT-2 vs Hugging Face `transformers`' GPT2LMHeadModel with the same dimensions, batch,
   sequence length and torch (fwd + bwd + AdamW step, fp32, CPU by default);
2. `bln-train`'s loop with MLflow logging every step vs tracking off (same config, same process).

Variants are interleaved across repeats and the median is reported, because this machine is
shared and absolute times drift; the ratios are the result.

    python benchmarks/train_throughput.py [--repeats 7] [--write]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe

from bln_sweeps.model import GPT, GPTConfig

DIMS = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=2048)
B, T = 8, 256


def our_model() -> torch.nn.Module:
    return GPT(GPTConfig(block_size=T, bias=True, **DIMS))


def hf_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=DIMS["vocab_size"],
        n_positions=T,
        n_embd=DIMS["n_embd"],
        n_layer=DIMS["n_layer"],
        n_head=DIMS["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_new",  # GPT-2's tanh GELU, as ours
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "sdpa"  # the same attention kernel as ours
    return GPT2LMHeadModel(cfg)


def step_fn(model: torch.nn.Module, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, DIMS["vocab_size"], (B, T), generator=g)

    def step():
        if hf:
            loss = model(input_ids=x, labels=x).loss
        else:
            _, loss = model(x, x.roll(-1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, n: int) -> float:
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(n):
        step()
    return n * B * T / (time.perf_counter() - t)  # tokens/s


def model_comparison(repeats: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    ours, theirs = our_model(), hf_model()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_hf, (n_ours, n_hf)  # same architecture, same size
    fns = {"ours": step_fn(ours, False), "hf": step_fn(theirs, True)}
    tps = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            tps[k].append(time_steps(fn, steps))
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {
        "ours_tok_s": med["ours"],
        "hf_tok_s": med["hf"],
        "ratio": med["ours"] / med["hf"],
        "params": n_ours,
    }


def tracking_overhead(repeats: int, steps: int) -> dict[str, float]:
    from bln_sweeps.compose import compose
    from bln_sweeps.config import to_run_config, validate
    from bln_sweeps.train import run

    tmp = Path(tempfile.mkdtemp())
    uri = f"sqlite:///{tmp}/mlflow.db"

    def once(tracking: bool, i: int) -> float:
        cfg = validate(
            to_run_config(
                compose(
                    [
                        "model.n_layer=4",
                        "model.n_embd=128",
                        "batch=b8",
                        "seq=s256",
                        f"train.steps={steps}",
                        f"train.eval_interval={steps}",
                        "eval.tokens=512",
                        "train.log_interval=1",
                        "train.checkpoint_interval=0",
                        "train.resume=false",
                        f"train.out_dir={tmp}/runs/{tracking}-{i}",
                        f"tracking.uri={uri}",
                        f"tracking.enabled={str(tracking).lower()}",
                    ]
                )
            )
        )
        result = run(cfg)
        return steps * cfg.batch.size * cfg.seq.len / result["wall_s"]

    once(True, -1)  # create the store (MLflow migrations) outside the measurement
    tps = {True: [], False: []}
    for i in range(repeats):
        for tracking in (False, True):
            tps[tracking].append(once(tracking, i))
    on, off = statistics.median(tps[True]), statistics.median(tps[False])
    return {"on_tok_s": on, "off_tok_s": off, "ratio": on / off}


def machine() -> str:
    return describe(f"torch {torch.__version__}", f"{torch.get_num_threads()} threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tracking-steps", type=int, default=60)
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = p.parse_args()
    m = model_comparison(args.repeats, args.steps)
    t = tracking_overhead(args.repeats, args.tracking_steps)
    section = "\n".join(
        [
            "## Training throughput (benchmarks/train_throughput.py)",
            "",
            f"Machine: {machine()}. Medians of {args.repeats} interleaved repeats, fp32 CPU.",
            "",
            "| comparison | tokens/s | peer tokens/s | ratio | target |",
            "|---|---|---|---|---|",
            f"| our GPT-2 vs HF `GPT2LMHeadModel` (L{DIMS['n_layer']} C{DIMS['n_embd']} "
            f"V{DIMS['vocab_size']}, B{B} T{T}, {m['params']:,} params, fwd+bwd+AdamW) "
            f"| {m['ours_tok_s']:,.0f} | {m['hf_tok_s']:,.0f} | **{m['ratio']:.2f}×** | ≥ 1.0× |",
            f"| `bln-train` loop, MLflow logging every step vs tracking off "
            f"({args.tracking_steps} steps, B8 T256) "
            f"| {t['on_tok_s']:,.0f} | {t['off_tok_s']:,.0f} | **{t['ratio']:.3f}×** | ≥ 0.98× |",
            "",
        ]
    )
    print(section)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", section)


def write_section(path: Path, section: str) -> None:
    """Replace (or append) this script's section of BENCHMARKS.md, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    head = section.splitlines()[0]
    lines, out, skipping = text.splitlines(), [], False
    for line in lines:
        if line == head:
            skipping = True
            continue
        if skipping and line.startswith("## "):
            skipping = False
        if not skipping:
            out.append(line)
    path.write_text("\n".join(out).rstrip() + "\n\n" + section)


if __name__ == "__main__":
    main()
