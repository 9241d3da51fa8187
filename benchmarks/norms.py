"""Forward + backward time of every norm variant relative to torch.nn.LayerNorm, side by side.

One train-mode forward and backward on x (B, T, C) = (8, 1024, 768) fp32 on CPU, the shape of
one GPT-2 124M norm site at nanoGPT's micro-batch. Variants are interleaved within each repeat
(in a rotating order) and the median over repeats is reported, because this machine is shared and
absolute times drift; the ratios to LayerNorm measured in the same run are the result.

Two measurements, side by side: wall-clock time with torch's default threads (the headline), and
CPU time with one thread, which other processes on a shared machine disturb much less.

    python benchmarks/norms.py [--repeats 21] [--write]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from machine import describe

from bln_sweeps.norms import build_norm

B, T, C = 8, 1024, 768
N_HEAD = 12  # PowerNorm's groups in GPT-2 124M

# label -> (module factory, target ratio to torch.nn.LayerNorm or None)
VARIANTS = {
    "torch.nn.LayerNorm (reference)": (lambda: torch.nn.LayerNorm(C), None),
    "layernorm": (lambda: build_norm("layernorm", C), None),
    "rmsnorm": (lambda: build_norm("rmsnorm", C), 1.0),
    "torch.nn.RMSNorm (for comparison)": (lambda: torch.nn.RMSNorm(C, eps=1e-5), None),
    "batchnorm": (lambda: build_norm("batchnorm", C), 1.5),
    "causal_batchnorm": (lambda: build_norm("causal_batchnorm", C), None),
    "bln (batch_axes=batch)": (lambda: build_norm("bln", C, batch_size=B, max_len=T), 2.5),
    "bln (batch_axes=batch_time)": (
        lambda: build_norm("bln", C, batch_size=B, max_len=T, batch_axes="batch_time"),
        2.5,
    ),
    "powernorm (groups=12)": (lambda: build_norm("powernorm", C, groups=N_HEAD), 2.0),
}


def step_fn(module: torch.nn.Module):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, T, C, generator=g) * 2 + 0.5).requires_grad_()
    dy = torch.randn(B, T, C, generator=g)
    module.train()

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)

    return step


def measure(repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per fwd+bwd of each variant, interleaved in a rotating order."""
    steps = {label: step_fn(factory()) for label, (factory, _) in VARIANTS.items()}
    for step in steps.values():  # warm-up: allocator, thread pool, first-call paths
        step(), step()
    times = {label: [] for label in steps}
    labels = list(steps)
    for r in range(repeats):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            t = clock()
            steps[label]()
            times[label].append(clock() - t)
    return {label: statistics.median(v) for label, v in times.items()}


def machine() -> str:
    return describe(f"torch {torch.__version__}", f"{torch.get_num_threads()} threads")


def table(wall: dict[str, float], cpu: dict[str, float], threads: int, repeats: int) -> str:
    ref = "torch.nn.LayerNorm (reference)"
    rows = [
        "## Normalization layers (benchmarks/norms.py)",
        "",
        f"Machine: {machine()}. One train-mode forward + backward on (B, T, C) = ({B}, {T}, {C}) "
        f"fp32; medians of {repeats} interleaved repeats; ratio = time / torch.nn.LayerNorm's "
        f"in the same run. Wall clock with {threads} threads (headline; the target applies to "
        "it) and CPU time with 1 thread (less disturbed by other processes).",
        "",
        f"| variant | wall ms ({threads} thr) | ratio | CPU ms (1 thr) | ratio | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, (_, target) in VARIANTS.items():
        ratio, ratio_cpu = wall[label] / wall[ref], cpu[label] / cpu[ref]
        verdict = "" if target is None else ("met" if ratio <= target else "**missed**")
        target_s = "" if target is None else f"≤ {target:.1f}×"
        rows.append(
            f"| {label} | {wall[label] * 1e3:.1f} | {ratio:.2f}× | {cpu[label] * 1e3:.1f} "
            f"| {ratio_cpu:.2f}× | {target_s} | {verdict} |"
        )
    return "\n".join(rows) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace (or append) this script's section of BENCHMARKS.md, leaving the others alone.
    The section ends at the next '## ' heading; text after the table inside it (the analysis)
    is kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    head = section.splitlines()[0]
    lines = text.splitlines()
    if head not in lines:
        path.write_text(text.rstrip() + "\n\n" + section)
        return
    start = lines.index(head)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = lines[start:end]
    # keep the hand-written notes that follow the generated table
    table_end = max(i for i, line in enumerate(body) if line.startswith("|"))
    notes = body[table_end + 1 :]
    new = section.rstrip().splitlines() + notes
    path.write_text("\n".join(lines[:start] + new + lines[end:]).rstrip() + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--write", action="store_true", help="update this section of BENCHMARKS.md")
    args = p.parse_args()
    threads = torch.get_num_threads()
    wall = measure(args.repeats)
    torch.set_num_threads(1)
    cpu = measure(args.repeats, clock=time.thread_time)
    torch.set_num_threads(threads)
    section = table(wall, cpu, threads, args.repeats)
    print(section)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", section)


if __name__ == "__main__":
    main()
