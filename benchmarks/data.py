"""How long the built-in synthetic corpus takes to generate (every run of a sweep builds it).

    python benchmarks/data.py [--tokens 4000000] [--repeats 3]

The unit tests check what the corpus is (deterministic, in vocabulary); its speed is measured
here, where a slow shared CI machine cannot turn it into a red test.
"""

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4_000_000)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from bln_sweeps.synthetic import synthetic_tokens

    times = []
    for seed in range(args.repeats):
        synthetic_tokens.cache_clear()
        t = time.perf_counter()
        synthetic_tokens(args.tokens, args.vocab, seed)
        times.append(time.perf_counter() - t)
    best = min(times)
    print(
        f"synthetic corpus, {args.tokens:,} tokens: best {best:.2f} s of {args.repeats}"
        f" ({args.tokens / best / 1e6:.1f} M tokens/s)"
    )


if __name__ == "__main__":
    main()
