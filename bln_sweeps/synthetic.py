"""The synthetic corpus: a seeded language with long-range structure, generated in memory.

`data=synthetic` (the default) trains on `synthetic_tokens(n, data.vocab_size, data.seed, split)`:
no files, no internet, and enough long-range structure (copy spans, key-value recall) that sequence
length and the norm matter. `check_synthetic` is what a config must satisfy for it. bln_sweeps.data
turns it into a run's TokenSource; `bln-prepare --synthetic` writes it as shards.

Importing this module does not import torch.
"""

import functools

import numpy as np

from bln_sweeps.config import ConfigError

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
