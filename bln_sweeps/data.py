"""Token data for one run: the synthetic corpus, token shards, and batch sampling.

Two sources, picked by `data.name`:
- `synthetic` (default): generated in memory from `data.seed` (see `synthetic_tokens`); no files,
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
light. At ~450 lines it is over the ~400 we aim for: the corpus, the shard format and the sampler
share the `Tokens` type and the window rule; the synthetic corpus (constants, `synthetic_tokens`
and its helpers) is the piece to move to its own module if this one grows.
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

# A split's tokens: one array, or one per shard (a window never crosses a shard boundary).
Tokens = np.ndarray | Sequence[np.ndarray]

# -----------------------------------------------------------------------------
# The synthetic corpus

STORE, QUERY = 0, 1  # marker ids: "STORE key value" binds key; "QUERY key value" recalls it
N_SPECIAL = 2  # ids below this are markers; the Markov background uses ids N_SPECIAL..V-1
MIN_VOCAB = 32
SPLITS = ("train", "val")

FANOUT = 16  # successors per token in the background's transition table
ZIPF_UNIGRAM = 1.0  # exponent of the token popularity the successors are drawn from
ZIPF_SUCCESSOR = 1.2  # exponent over a token's successors, by rank (most likely first)
LANE_LEN = 1024  # the background is generated as parallel chains of this length
MEAN_GAP = 48  # mean background tokens between two events (geometric)
EVENT_P = (0.5, 0.25, 0.25)  # an event is a copy span, a STORE record or a QUERY record
COPY_LEN = (8, 48)  # copy span length, uniform, inclusive
DISTANCE = (64, 4096)  # copy gap and query-to-store distance: log-uniform, tokens


def check_synthetic(vocab_size: int, n_train: int, n_val: int, seq_len: int = 0) -> None:
    """The corpus needs room for its markers, uint16 ids, and more than seq_len + 1 tokens."""
    if not MIN_VOCAB <= vocab_size <= 2**16:
        raise ConfigError("data.vocab_size", vocab_size, f"must be in [{MIN_VOCAB}, 65536]")
    for key, n in (("data.n_train_tokens", n_train), ("data.n_val_tokens", n_val)):
        if n <= seq_len + 1:
            raise ConfigError(key, n, f"must exceed seq.len + 1 = {seq_len + 1}")
    if n_val // 2 <= seq_len + 1:  # the val and test halves each need a window
        raise ConfigError(
            "data.n_val_tokens", n_val, f"must exceed 2 x (seq.len + 1) = {2 * (seq_len + 1)}"
        )


def _log_uniform(rng: np.random.Generator, size: int) -> np.ndarray:
    lo, hi = np.log(DISTANCE[0]), np.log(DISTANCE[1])
    return np.exp(rng.uniform(lo, hi, size)).astype(np.int64)


@functools.lru_cache(maxsize=16)  # many runs in one process (a sweep worker) reuse the corpus
def synthetic_tokens(n_tokens: int, vocab_size: int, seed: int, split: str = "train") -> np.ndarray:
    """`n_tokens` uint16 token ids in [0, vocab_size): a seeded language with long-range structure.

    The language (its transition table) depends on `seed` only; the text drawn from it depends on
    (`seed`, `split`), so train and val are different samples of the same language. Same arguments,
    same bytes. The array is cached per process and read-only.

    What a model can learn, from short to long range:
    - Background (~80% of tokens): a first-order Markov chain. Each token has FANOUT successors
      drawn from a Zipfian popularity over ids N_SPECIAL..V-1, taken with Zipfian probabilities by
      rank. A bigram model gets all of this (about 2.2 nats/token at V=512), and no more.
    - Copy spans (~15% of tokens): 8-48 background tokens repeated verbatim 64-4096 tokens later
      (log-uniform gap, so every doubling of the sequence length brings a similar share of copies
      into reach). Unmarked, like repeated text: after a few tokens of a span, a model that can
      attend back to its first occurrence (an induction head) predicts the rest exactly.
    - Key-value recall: `STORE k v` records, and later (64-4096 tokens, log-uniform)
      `QUERY k v'` where v' is the value of the most recent `STORE k`. Keys and values are
      uniform, so v' costs ln(V) nats unless the model retrieves the store.
    Markers occur only in records: copies never copy one, so every query's answer is well defined.
    A model with context T can use the copies and recalls whose distance is below T; the rest are
    noise to it.
    """
    if split not in SPLITS:
        raise ConfigError("split", split, f"valid: {', '.join(SPLITS)}")
    if not MIN_VOCAB <= vocab_size <= 2**16:
        raise ConfigError("data.vocab_size", vocab_size, f"must be in [{MIN_VOCAB}, 65536]")
    if n_tokens <= 0:
        raise ConfigError("n_tokens", n_tokens, "must be > 0")
    n_regular = vocab_size - N_SPECIAL
    table_rng = np.random.default_rng([seed, 0])
    rng = np.random.default_rng([seed, 1 + SPLITS.index(split)])
    # The helpers draw from `rng` in this order; another order would change every corpus.
    out = _background(n_tokens, n_regular, table_rng, rng)
    kind, length, start = _event_slots(n_tokens, rng)
    stores = _write_stores(out, start[kind == 1], vocab_size, rng)
    _write_queries(out, start[kind == 2], stores, n_tokens, rng)
    _write_copies(out, start[kind == 0], length[kind == 0], rng)
    out.flags.writeable = False  # shared by every caller through the cache
    return out


def _background(
    n_tokens: int, n_regular: int, table_rng: np.random.Generator, rng: np.random.Generator
) -> np.ndarray:
    """The Markov background, `n_tokens` uint16 ids in [N_SPECIAL, V)."""
    # The language: successors (R, FANOUT) of each regular token, drawn from the Zipfian unigram.
    unigram = 1.0 / np.arange(1, n_regular + 1) ** ZIPF_UNIGRAM
    unigram /= unigram.sum()
    successors = table_rng.choice(n_regular, size=(n_regular, FANOUT), p=unigram)
    by_rank = 1.0 / np.arange(1, FANOUT + 1) ** ZIPF_SUCCESSOR
    rank_cdf = np.cumsum(by_rank / by_rank.sum())

    # `lanes` chains advance in lock-step, so the Python loop is LANE_LEN steps long whatever
    # n_tokens is. Each lane starts from the unigram; lanes are laid end to end.
    lanes = -(-n_tokens // LANE_LEN)
    ranks = np.searchsorted(rank_cdf, rng.random((LANE_LEN, lanes)))  # (L, lanes) successor ranks
    ranks = np.minimum(ranks, FANOUT - 1)  # guard against a cdf ending at 1 - eps
    state = rng.choice(n_regular, size=lanes, p=unigram)
    chains = np.empty((LANE_LEN, lanes), dtype=np.uint16)
    for t in range(LANE_LEN):
        chains[t] = state
        state = successors[state, ranks[t]]
    return (chains.T.reshape(-1)[:n_tokens] + N_SPECIAL).astype(np.uint16)


def _event_slots(n_tokens: int, rng: np.random.Generator):
    """(kind, length, start) of events at non-overlapping slots: background gap, event, background
    gap, event, ... kind 0 = copy span, 1 = STORE, 2 = QUERY."""
    n_max = n_tokens // MEAN_GAP + 16  # more than fit; the overflow is dropped below
    kind = rng.choice(3, size=n_max, p=EVENT_P)
    length = np.where(kind == 0, rng.integers(COPY_LEN[0], COPY_LEN[1] + 1, n_max), 3)
    start = np.cumsum(rng.geometric(1 / MEAN_GAP, n_max) + length) - length
    fits = start + length <= n_tokens
    return kind[fits], length[fits], start[fits]


def _write_stores(out: np.ndarray, s_pos: np.ndarray, vocab_size: int, rng: np.random.Generator):
    """STORE records at `s_pos`: fresh uniform keys and values. Returns (s_pos, keys, values)."""
    s_key = rng.integers(N_SPECIAL, vocab_size, len(s_pos))
    s_val = rng.integers(N_SPECIAL, vocab_size, len(s_pos))
    out[s_pos], out[s_pos + 1], out[s_pos + 2] = STORE, s_key, s_val
    return s_pos, s_key, s_val


def _write_queries(out: np.ndarray, q_pos: np.ndarray, stores, n_tokens: int, rng) -> None:
    """QUERY records: the key of the store found about a log-uniform distance back; the answer is
    the value of that key's most recent store (keys recur, so it may be a later one)."""
    s_pos, s_key, s_val = stores
    target = np.searchsorted(s_pos, q_pos - _log_uniform(rng, len(q_pos)), side="right") - 1
    q_pos, q_key = q_pos[target >= 0], s_key[target[target >= 0]]
    code = s_key * (n_tokens + 1) + s_pos  # sorted by (key, position)
    order = np.argsort(code)
    latest = order[np.searchsorted(code[order], q_key * (n_tokens + 1) + q_pos) - 1]
    out[q_pos], out[q_pos + 1], out[q_pos + 2] = QUERY, q_key, s_val[latest]


def _write_copies(out: np.ndarray, c_pos: np.ndarray, c_len: np.ndarray, rng) -> None:
    """Copy spans, in position order so that a span may copy an earlier copy. A source holding a
    marker is skipped (the slot keeps its background) so that copies never create bindings."""
    c_gap = np.maximum(_log_uniform(rng, len(c_pos)), c_len)  # the source ends before the span
    for dst, k, gap in zip(c_pos.tolist(), c_len.tolist(), c_gap.tolist(), strict=True):
        if dst < gap:
            continue
        src = out[dst - gap : dst - gap + k]
        if src.min() >= N_SPECIAL:
            out[dst : dst + k] = src


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
