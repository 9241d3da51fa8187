"""The GPU check: GPT-2 124M, bf16 autocast, torch.compile, every norm x seq 1024/2048/4096.

One command, sized for <= 8 minutes on one H100/H200:

    python benchmarks/gpu.py [--out gpu_table.md] [--write]
    python benchmarks/gpu.py --cpu-smoke          # the same code on the tiny model, on CPU

Per (norm, seq): training tokens/s (AdamW steps on random tokens, after warm-up steps that
include the compile), MFU (model.flops_per_token, PaLM's 6N + 12LCT, over the device's bf16
peak), peak memory, and tokens/s as a ratio to LayerNorm's at the same seq. Then the compiled
norm layers alone (fwd+bwd on (8, 1024, 768), bf16 input) against compiled torch.nn.LayerNorm.

One compile per norm serves all three sequence lengths: the sequence dimension is marked dynamic,
and the micro-batch is the same at every length. Dynamo's caches are reset between norms, whose
modules share the code objects of GPT.forward and Block.forward. A time limit (--time-limit)
stops starting new cells, which the table then shows as skipped.

Goals (issue 14) on one H100-class GPU: MFU >= 45% for LayerNorm at seq 1024; every other norm's
tokens/s >= 0.8x LayerNorm's.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from machine import describe
from norms import write_section

from bln_sweeps.build import flavour, peak_flops
from bln_sweeps.model import GPT
from bln_sweeps.norms import build_norm

NORMS = ("layernorm", "rmsnorm", "batchnorm", "bln", "powernorm", "dyt")
HEADING = "## GPU: GPT-2 124M training, bf16, compiled (benchmarks/gpu.py)"


def norm_options(name: str, batch: int, max_len: int, n_head: int) -> dict:
    """What build.norm_factory derives from a run: BLN's m is the micro-batch, PowerNorm's groups
    the heads."""
    return {"bln": {"batch_size": batch, "max_len": max_len}, "powernorm": {"groups": n_head}}.get(
        name, {}
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_cells(args, device: torch.device, deadline: float) -> list[dict]:
    """Tokens/s, MFU and peak memory of every (norm, seq)."""
    config = flavour(args.model, block_size=max(args.seqs))
    peak = peak_flops(device)
    rows = []
    for name in args.norms:
        torch._dynamo.reset()  # a fresh cache per norm: the recompile limit is per code object
        torch.manual_seed(0)
        opts = norm_options(name, args.batch, config.block_size, config.n_head)
        model = GPT(config, lambda site, n=name, o=opts: build_norm(n, config.n_embd, **o))
        model.to(device).train()
        compiled = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        for seq in args.seqs:
            row = {"norm": name, "seq": seq, "batch": args.batch}
            rows.append(row)
            if time.perf_counter() > deadline:
                row["skipped"] = "time limit"
                continue
            row |= train_cell(args, device, compiled, opt, seq, config.vocab_size)
            tps = row["tokens_per_s"]
            row["mfu"] = model.flops_per_token(seq) * tps / peak if peak else None
            print(row, flush=True)
    return rows


def train_cell(args, device, compiled, opt, seq: int, vocab: int) -> dict:
    """Warm-up steps (the first compiles), then the median of timed AdamW steps."""
    idx = torch.randint(0, vocab, (args.batch, seq + 1), device=device)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()  # (B, T) each
    torch._dynamo.mark_dynamic(x, 1)  # one graph for every seq
    torch._dynamo.mark_dynamic(y, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            _, loss = compiled(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    out = {"warmup_s": time.perf_counter() - t0}
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    out["loss"] = loss.item()
    out["tokens_per_s"] = args.batch * seq / statistics.median(times)
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def norm_cells(args, device: torch.device) -> dict[str, float]:
    """Median seconds per compiled fwd+bwd of each norm on (B, T, C), and of nn.LayerNorm."""
    B, T, C = args.norm_shape
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, T, C, device=device, generator=g, dtype=dtype).requires_grad_()
    dy = torch.randn(B, T, C, device=device, generator=g, dtype=dtype)
    factories = {"torch.nn.LayerNorm": lambda: torch.nn.LayerNorm(C)}
    for name in args.norms:
        opts = norm_options(name, B, T, args.norm_heads)
        factories[name] = lambda n=name, o=opts: build_norm(n, C, **o)
    steps = {}
    for label, factory in factories.items():
        module = factory().to(device).train()
        call = torch.compile(module)

        def step(module=module, call=call):
            x.grad = None
            for p in module.parameters():
                p.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                call(x).backward(dy)

        step(), step()  # compile and warm up
        steps[label] = step
    times = {label: [] for label in steps}
    for _ in range(args.norm_repeats):  # interleaved, as benchmarks/norms.py
        for label, step in steps.items():
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times[label].append(time.perf_counter() - t)
    return {label: statistics.median(v) for label, v in times.items()}


def table(args, device: torch.device, rows: list[dict], norms: dict[str, float]) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    lines = [
        HEADING,
        "",
        f"Device: {gpu}; host: {describe(f'torch {torch.__version__}')}. Model {args.model}, "
        f"micro-batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}, torch.compile "
        f"(sequence dimension dynamic), AdamW; medians of {args.steps} steps after "
        f"{args.warmup} warm-up steps. ratio = tokens/s / LayerNorm's at the same seq. "
        f"Command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`.",
        "",
        "| norm | seq | tokens/s | ratio | MFU | peak GiB | |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = {r["seq"]: r.get("tokens_per_s") for r in rows if r["norm"] == "layernorm"}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['norm']} | {r['seq']} | skipped ({r['skipped']}) | | | | |")
            continue
        tps, base = r["tokens_per_s"], ref.get(r["seq"])
        ratio = f"{tps / base:.2f}×" if base else ""
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = f"{r['peak_gib']:.1f}" if "peak_gib" in r else ""
        goal = ""
        if r["norm"] == "layernorm" and r["seq"] == 1024 and r["mfu"] is not None:
            goal = "MFU goal ≥ 45%: " + ("met" if r["mfu"] >= 0.45 else "**missed**")
        elif base and r["norm"] != "layernorm":
            goal = "goal ≥ 0.8×: " + ("met" if tps / base >= 0.8 else "**missed**")
        cells = [r["norm"], r["seq"], f"{tps:,.0f}", ratio, mfu, mem, goal]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if norms:
        ref_t = norms["torch.nn.LayerNorm"]
        B, T, C = args.norm_shape
        lines += [
            "",
            f"Compiled norm layers alone: fwd+bwd on ({B}, {T}, {C}), "
            f"{'bf16' if args.bf16 else 'fp32'}, medians of {args.norm_repeats} interleaved "
            "repeats, ratio to compiled torch.nn.LayerNorm.",
            "",
            "| norm | ms | ratio |",
            "|---|---|---|",
        ]
        for label, t in norms.items():
            lines.append(f"| {label} | {t * 1e3:.3f} | {t / ref_t:.2f}× |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, short seqs, on CPU")
    p.add_argument("--norms", default=",".join(NORMS), help="comma-separated registry keys")
    p.add_argument("--time-limit", type=float, default=420.0, help="seconds; then skip cells")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    p.add_argument("--write", action="store_true", help="update this section of BENCHMARKS.md")
    args = p.parse_args(argv)
    args.norms = [n for n in args.norms.split(",") if n]
    if "layernorm" not in args.norms:
        args.norms.insert(0, "layernorm")  # the reference of every ratio
    if args.cpu_smoke:
        args.model, args.seqs, args.batch, args.bf16 = "tiny", (32, 64), 4, False
        args.warmup, args.steps, args.norm_shape, args.norm_repeats = 2, 3, (4, 64, 64), 5
        args.norm_heads = 4
    else:
        args.model, args.seqs, args.batch, args.bf16 = "gpt2_124m", (1024, 2048, 4096), 8, True
        args.warmup, args.steps, args.norm_shape, args.norm_repeats = 3, 10, (8, 1024, 768), 50
        args.norm_heads = 12
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        sys.exit("benchmarks/gpu.py: no CUDA device; use --cpu-smoke to test it on CPU")
    deadline = time.perf_counter() + args.time_limit
    rows = model_cells(args, device, deadline)
    norms = norm_cells(args, device) if time.perf_counter() < deadline else {}
    text = table(args, device, rows, norms)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", text)


if __name__ == "__main__":
    main()
