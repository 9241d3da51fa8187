"""Token data for one run: token shards, the two sources, and batch sampling.

Two sources, picked by `data.name`:
- `synthetic` (default): generated in memory from `data.seed` (bln_sweeps.synthetic); no files,
  no internet, and enough long-range structure that sequence length and the norm matter.
- `tokens`: uint16 shards in `data.path`. Two formats are read: nanoGPT's raw `train.bin` /
  `val.bin` (bare uint16), and llm.c's (a 256 x int32 header: magic 20240520, version 1, token
  count; then uint16 tokens). `bln-prepare` (bln_sweeps.prepare) writes llm.c's. A split's shards
  are the files matching `*train*.bin` / `*val*.bin` (`train_000000.bin`, ...).

Batches are independent random windows, one per row, never one contiguous chunk reshaped to (B, T):
with contiguous rows, row b+1 continues row b, and a norm with batch statistics leaks the target of
the last position (research/NORMS.md §8.3). The sampler's RNG state is checkpointed, so a resumed
run sees exactly the batches it would have seen. The held-out tokens are cut in two (`eval_splits`):
val (selection) and test (reporting), each a fixed set of windows (`eval_windows`).

Importing this module does not import torch (only `get_batch` does): `bln-prepare --help` stays
light.
"""

import functools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bln_sweeps.config import ConfigError, DataConfig, RunConfig
from bln_sweeps.synthetic import SPLITS, check_synthetic, synthetic_tokens

# A split's tokens: one array, or one per shard (a window never crosses a shard boundary).
Tokens = np.ndarray | Sequence[np.ndarray]

# -----------------------------------------------------------------------------
# Shards

LLMC_MAGIC, LLMC_VERSION = 20240520, 1
HEADER_INTS = 256  # llm.c header: 256 int32 = 1024 bytes before the tokens
SHARD_TOKENS = 100_000_000  # bln-prepare starts a new shard every 100M tokens (200 MB), as llm.c


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write `tokens` as an llm.c shard (header + uint16), atomically (temp file + rename)."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16 and len(tokens) and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids [{tokens.min()}, {tokens.max()}] do not fit uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = LLMC_MAGIC, LLMC_VERSION, len(tokens)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        np.asarray(tokens, dtype=np.uint16).tofile(f)
    os.replace(tmp, path)


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (uint16, read-only): llm.c format if the file starts with its
    magic number, nanoGPT's raw uint16 otherwise. (A raw file cannot start with the magic: it would
    need token 55000 first, outside GPT-2's 50257.)"""
    path = Path(path)
    size = path.stat().st_size
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS) if size >= 4 * HEADER_INTS else []
    if len(header) and header[0] == LLMC_MAGIC:
        if header[1] != LLMC_VERSION:
            raise ValueError(
                f"{path}: llm.c shard version {header[1]}; only version 1 (uint16 tokens) is read"
            )
        n = int(header[2])
        if size != 4 * HEADER_INTS + 2 * n:
            raise ValueError(f"{path}: header says {n} tokens but the file has {size} bytes")
        offset = 4 * HEADER_INTS
    else:
        if size % 2:
            raise ValueError(f"{path}: {size} bytes is not a whole number of uint16 tokens")
        n, offset = size // 2, 0
    if n == 0:
        return np.zeros(0, dtype=np.uint16)  # np.memmap cannot map zero bytes
    return np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(n,))


def shard_length(path: Path) -> int:
    """Tokens in a shard, from its header or size, without reading the tokens."""
    return len(read_shard(path))


def find_shards(directory: str | Path | None, split: str) -> list[Path]:
    """The split's shards in `directory` (`*train*.bin` / `*val*.bin`), sorted by name."""
    expected = "a directory of *train*.bin and *val*.bin token shards (make one with bln-prepare)"
    if directory is None:
        raise ConfigError("data.path", directory, f"data=tokens needs {expected}")
    if not Path(directory).is_dir():
        raise ConfigError("data.path", str(directory), f"no such directory; expected {expected}")
    paths = sorted(p for p in Path(directory).glob(f"*{split}*.bin") if p.is_file())
    if not paths:
        raise ConfigError(
            "data.path", str(directory), f"no *{split}*.bin shards; expected {expected}"
        )
    return paths


@functools.lru_cache(maxsize=256)
def _max_token(path: str, size: int, mtime_ns: int) -> int:
    shard = read_shard(path)
    return int(shard.max()) if len(shard) else -1


def shards_vocab(directory: str | Path, paths: Iterable[Path]) -> int:
    """max token id + 1 over the shards: `vocab_size` from bln-prepare's meta.json when present
    (trusted, so huge datasets are not scanned), else a scan (cached per file in-process)."""
    meta = Path(directory) / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text())["vocab_size"])
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return max(_max_token(*s) for s in stats) + 1


def check_vocab(data_vocab: int, model_vocab: int) -> None:
    """The model's embedding must cover every token id of the data."""
    if data_vocab > model_vocab:
        raise ConfigError(
            "model.vocab_size",
            model_vocab,
            f"the data has token ids up to {data_vocab - 1}; needs >= {data_vocab}",
        )


# -----------------------------------------------------------------------------
# What a run trains and validates on


@dataclass(frozen=True)
class TokenSource:
    train: Tokens  # one array, or one per shard (memmaps for data=tokens)
    val: Tokens
    vocab_size: int  # max token id + 1 the model must support


DATA_NAMES = ("synthetic", "tokens")


def build_run_data(cfg: RunConfig) -> TokenSource:
    """The train and val tokens a run trains on: its data.*, seq.len and model.vocab_size fill
    build_data's keywords. Bad input raises ConfigError naming the key."""
    return build_data(
        cfg.data.name,
        seq_len=cfg.seq.len,
        vocab_size=cfg.data.vocab_size,
        seed=cfg.data.seed,
        path=cfg.data.path,
        n_train_tokens=cfg.data.n_train_tokens,
        n_val_tokens=cfg.data.n_val_tokens,
        model_vocab_size=cfg.model.vocab_size,
    )


def build_data(
    name: str,
    *,
    seq_len: int | None = None,
    vocab_size: int = DataConfig.vocab_size,
    seed: int = DataConfig.seed,
    path: str | Path | None = None,
    n_train_tokens: int = DataConfig.n_train_tokens,
    n_val_tokens: int = DataConfig.n_val_tokens,
    model_vocab_size: int | None = None,
) -> TokenSource:
    """The train and val tokens of `name` (synthetic | tokens), validated for `seq_len`.

    `vocab_size`, `seed` and the token counts describe the synthetic corpus; `path` the shard
    directory. With `model_vocab_size`, the data's token ids are checked against it. Bad input
    raises ConfigError naming the key (a run's config: build_run_data).
    """
    if name == "synthetic":
        check_synthetic(vocab_size, n_train_tokens, n_val_tokens, seq_len=seq_len or 0)
        source = TokenSource(
            train=synthetic_tokens(n_train_tokens, vocab_size, seed, "train"),
            val=synthetic_tokens(n_val_tokens, vocab_size, seed, "val"),
            vocab_size=vocab_size,
        )
    elif name == "tokens":
        splits = {split: find_shards(path, split) for split in SPLITS}
        if seq_len is not None:
            check_shard_lengths(splits, seq_len)
        shards = {s: [read_shard(p) for p in paths] for s, paths in splits.items()}
        source = TokenSource(
            train=shards["train"][0] if len(shards["train"]) == 1 else shards["train"],
            val=shards["val"][0] if len(shards["val"]) == 1 else shards["val"],
            vocab_size=shards_vocab(path, [*splits["train"], *splits["val"]]),
        )
    else:
        raise ConfigError("data.name", name, f"valid: {', '.join(DATA_NAMES)}")
    if model_vocab_size is not None:
        check_vocab(source.vocab_size, model_vocab_size)
    return source


def check_shard_lengths(splits: dict[str, list[Path]], seq_len: int) -> None:
    """Windows never cross shards, so each split needs one shard longer than seq.len + 1."""
    for split, paths in splits.items():
        longest = max(paths, key=shard_length)
        n = shard_length(longest)
        if n <= seq_len + 1:
            raise ConfigError(
                "seq.len",
                seq_len,
                f"needs a {split} shard longer than seq.len + 1 tokens; the longest, {longest},"
                f" has {n}",
            )


def check_data(cfg: RunConfig) -> None:
    """Everything build_run_data(cfg) would reject, without generating or scanning a corpus when it
    can be avoided (bln-train checks every grid point with this before starting)."""
    if cfg.data.name == "synthetic":
        d = cfg.data
        check_synthetic(d.vocab_size, d.n_train_tokens, d.n_val_tokens, seq_len=cfg.seq.len)
        check_vocab(cfg.data.vocab_size, cfg.model.vocab_size)
    else:
        build_run_data(cfg)  # shards are memory-mapped: cheap, bar the vocab scan (cached)


# -----------------------------------------------------------------------------
# Batches


def _windows(tokens: Tokens, seq_len: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The shards, and the cumulative count of (seq_len + 1)-token windows that fit in each."""
    shards = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
    counts = np.array([max(len(s) - seq_len, 0) for s in shards], dtype=np.int64)
    if counts.sum() == 0:
        longest = max(len(s) for s in shards)
        raise ConfigError(
            "seq.len", seq_len, f"longer than the data allows (longest shard {longest})"
        )
    return shards, np.cumsum(counts)


def get_batch(tokens: Tokens, batch_size: int, seq_len: int, generator: np.random.Generator):
    """x, y: (B, T) int64 CPU tensors, y = x shifted by one; each row an independent window.

    Rows are drawn uniformly from every window of every shard, one `generator` draw per batch.
    """
    import torch

    shards, ends = _windows(tokens, seq_len)
    w = generator.integers(0, ends[-1], size=batch_size)  # (B,) global window index
    shard = np.searchsorted(ends, w, side="right")
    start = w - np.concatenate([[0], ends])[shard]
    rows = [
        shards[s][i : i + seq_len + 1] for s, i in zip(shard.tolist(), start.tolist(), strict=True)
    ]
    buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class BatchSampler:
    """An endless stream of training batches whose position can be checkpointed.

    Same seed, same batches; `load_state_dict(state_dict())` taken after k batches makes the
    sampler continue with batch k + 1 exactly.
    """

    def __init__(self, tokens: Tokens, batch_size: int, seq_len: int, seed: int = 0):
        _windows(tokens, seq_len)  # fail now, not at the first batch
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rng = np.random.default_rng(seed)
        self.batches = 0  # drawn so far

    def next_batch(self):
        self.batches += 1
        return get_batch(self.tokens, self.batch_size, self.seq_len, self.rng)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches": self.batches, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.batches = state["seed"], state["batches"]
        self.rng.bit_generator.state = state["rng"]


def eval_splits(tokens: Tokens) -> dict[str, list[np.ndarray]]:
    """The held-out tokens cut in two: each shard's first half is the selection split (`val`,
    what the search and the pruner read), its second half the test split (`test`, what tables
    report). No window crosses the cut, so the two never share a token."""
    shards = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
    return {
        "val": [s[: len(s) // 2] for s in shards],
        "test": [s[len(s) // 2 :] for s in shards],
    }


def eval_windows(tokens: Tokens, seq_len: int, n_tokens: int, seed: int = 0):
    """The fixed evaluation set of one split: max(1, n_tokens // seq_len) random windows as
    (x, y), each (N, T) int64. They depend on the data, seq_len, n_tokens and seed only, never on
    the batch size, so every cell of a sweep is scored on the same windows."""
    n = max(1, n_tokens // seq_len)
    return get_batch(tokens, n, seq_len, np.random.default_rng(seed))
