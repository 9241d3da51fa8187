"""Forward + backward time of every norm variant relative to torch.nn.LayerNorm, side by side.

One train-mode forward and backward on x (B, T, C) = (8, 1024, 768) fp32 on CPU, the shape of
one GPT-2 124M norm site at nanoGPT's micro-batch. Variants are interleaved within each repeat
(in a rotating order) and the median over repeats is reported, because this machine is shared and
absolute times drift; the ratios to LayerNorm measured in the same run are the result.

Three measurements: wall-clock time with torch's default threads (the headline), CPU time with
one thread, which other processes on a shared machine disturb much less, and wall-clock time of
each module under torch.compile against torch.nn.LayerNorm under torch.compile (the path
`train.compile=true` takes; the eager and compiled steps are interleaved in the same repeats).

    python benchmarks/norms.py [--repeats 21] [--no-compile] [--write]
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

# label -> (module factory, target ratio to torch.nn.LayerNorm eager, and compiled, or None)
VARIANTS = {
    "torch.nn.LayerNorm (reference)": (lambda: torch.nn.LayerNorm(C), None, None),
    "layernorm": (lambda: build_norm("layernorm", C), None, None),
    "rmsnorm": (lambda: build_norm("rmsnorm", C), 1.0, 1.1),
    "torch.nn.RMSNorm (for comparison)": (lambda: torch.nn.RMSNorm(C, eps=1e-5), None, None),
    "batchnorm": (lambda: build_norm("batchnorm", C), 1.5, 1.5),
    "causal_batchnorm": (lambda: build_norm("causal_batchnorm", C), None, None),
    "bln (batch_axes=batch)": (lambda: build_norm("bln", C, batch_size=B, max_len=T), 2.5, 2.0),
    "bln (batch_axes=batch_time)": (
        lambda: build_norm("bln", C, batch_size=B, max_len=T, batch_axes="batch_time"),
        2.5,
        2.0,
    ),
    "powernorm (groups=12)": (lambda: build_norm("powernorm", C, groups=N_HEAD), 2.0, 1.8),
}
REF = "torch.nn.LayerNorm (reference)"


def step_fn(module: torch.nn.Module, compiled: bool = False):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, T, C, generator=g) * 2 + 0.5).requires_grad_()
    dy = torch.randn(B, T, C, generator=g)
    module.train()
    call = torch.compile(module) if compiled else module

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        call(x).backward(dy)

    return step


def measure(repeats: int, clock=time.perf_counter, compiled: bool = False) -> dict:
    """Median seconds per fwd+bwd of each variant, interleaved in a rotating order. Keys are the
    labels, and (label, "compiled") for the compiled modules when `compiled`."""
    steps = {label: step_fn(factory()) for label, (factory, *_) in VARIANTS.items()}
    if compiled:  # the first two calls below compile (a minute or more in all on 2 cores)
        steps |= {(label, "compiled"): step_fn(f(), True) for label, (f, *_) in VARIANTS.items()}
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


def verdict(ratio: float, target: float | None) -> tuple[str, str]:
    if target is None:
        return "", ""
    return f"≤ {target:.1f}×", "met" if ratio <= target else "**missed**"


def table(wall: dict, cpu: dict[str, float], threads: int, repeats: int) -> str:
    ref = REF
    compiled = (ref, "compiled") in wall
    rows = [
        "## Normalization layers (benchmarks/norms.py)",
        "",
        f"Machine: {machine()}. One train-mode forward + backward on (B, T, C) = ({B}, {T}, {C}) "
        f"fp32; medians of {repeats} interleaved repeats; ratio = time / torch.nn.LayerNorm's "
        f"in the same run. Wall clock with {threads} threads (headline; the target applies to "
        "it) and CPU time with 1 thread (less disturbed by other processes)."
        + (
            f" Compiled: each module under torch.compile (Inductor), wall clock with {threads} "
            "threads, ratio to torch.nn.LayerNorm under torch.compile, measured in the same "
            "interleaved repeats as the eager columns."
            if compiled
            else ""
        ),
        "",
        f"| variant | wall ms ({threads} thr) | ratio | CPU ms (1 thr) | ratio | target | |"
        + (" compiled ms | ratio | target | |" if compiled else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|---|---|" if compiled else ""),
    ]
    for label, (_, target, target_compiled) in VARIANTS.items():
        ratio, ratio_cpu = wall[label] / wall[ref], cpu[label] / cpu[ref]
        row = (
            f"| {label} | {wall[label] * 1e3:.1f} | {ratio:.2f}× | {cpu[label] * 1e3:.1f} "
            f"| {ratio_cpu:.2f}× | {' | '.join(verdict(ratio, target))} |"
        )
        if compiled:
            t, t_ref = wall[label, "compiled"], wall[ref, "compiled"]
            row += f" {t * 1e3:.1f} | {t / t_ref:.2f}× | "
            row += " | ".join(verdict(t / t_ref, target_compiled)) + " |"
        rows.append(row)
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
    rows = [i for i, line in enumerate(body) if line.startswith("|")]
    notes = body[max(rows) + 1 :] if rows else [""]  # no table yet ("not yet run"): replace all
    new = section.rstrip().splitlines() + notes
    path.write_text("\n".join(lines[:start] + new + lines[end:]).rstrip() + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--write", action="store_true", help="update this section of BENCHMARKS.md")
    p.add_argument("--no-compile", action="store_true", help="eager columns only (fast)")
    args = p.parse_args()
    threads = torch.get_num_threads()
    wall = measure(args.repeats, compiled=not args.no_compile)
    torch.set_num_threads(1)
    cpu = measure(args.repeats, clock=time.thread_time)
    torch.set_num_threads(threads)
    section = table(wall, cpu, threads, args.repeats)
    print(section)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", section)


if __name__ == "__main__":
    main()
