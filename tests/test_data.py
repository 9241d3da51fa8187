"""Data: the synthetic corpus's structure, shard formats, batch sampling and resume, bln-prepare."""

import hashlib
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bln_sweeps.config import ConfigError
from bln_sweeps.data import (
    BatchSampler,
    build_data,
    build_run_data,
    check_data,
    check_vocab,
    eval_windows,
    get_batch,
    read_shard,
    write_shard,
)
from bln_sweeps.prepare import main
from bln_sweeps.synthetic import QUERY, STORE, synthetic_tokens

V = 512


def repeated_ngrams(tokens: np.ndarray, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(start, distance back) of every n-gram that also occurred earlier. A 12-gram recurs by
    chance in the Markov background about once per 1,000 tokens; copy spans recur by design."""
    x = tokens.astype(np.uint64)
    h = np.zeros(len(x) - n + 1, dtype=np.uint64)
    for j in range(n):  # polynomial hash of the n-gram starting at each position
        h = h * np.uint64(1_000_003) + x[j : len(x) - n + 1 + j]
    order = np.argsort(h, kind="stable")  # equal hashes stay in position order
    same = np.flatnonzero(h[order][1:] == h[order][:-1])
    return order[same + 1], order[same + 1] - order[same]


def test_synthetic_is_deterministic_fast_and_in_vocab():
    synthetic_tokens.cache_clear()
    a = synthetic_tokens(4_000_000, V, 1)  # its speed is measured in benchmarks/, not here
    assert a.dtype == np.uint16 and len(a) == 4_000_000 and a.max() < V
    synthetic_tokens.cache_clear()
    assert np.array_equal(a, synthetic_tokens(4_000_000, V, 1))  # regenerated, same bytes
    assert not np.array_equal(a[:1000], synthetic_tokens(4_000_000, V, 2)[:1000])
    assert not np.array_equal(a[:1000], synthetic_tokens(4_000_000, V, 1, "val")[:1000])
    assert not a.flags.writeable  # shared through the cache


def test_synthetic_corpus_bytes_are_pinned():
    """Runs on different machines (and sweeps months apart) must train on the same corpus. numpy
    does not promise identical Generator streams across versions: if this fails after an upgrade,
    the corpus changed and old and new runs are not comparable."""
    digest = {
        split: hashlib.sha256(synthetic_tokens(100_000, V, 1234, split).tobytes()).hexdigest()
        for split in ("train", "val")
    }
    assert digest["train"][:16] == "cc9aef0d0e671dfa" and digest["val"][:16] == "eb1e8e2d46dd7325"


def test_copy_spans_recur_verbatim_hundreds_to_thousands_of_tokens_later():
    x = synthetic_tokens(500_000, V, 3)
    starts, dist = repeated_ngrams(x)
    covered = np.zeros(len(x), dtype=bool)
    for j in range(12):
        covered[starts + j] = True
    assert covered.mean() > 0.10  # ~15% of tokens are copies
    assert np.mean((dist >= 64) & (dist <= 4096 + 48)) > 0.9
    assert np.mean(dist > 1024) > 0.2 and np.mean(dist < 512) > 0.2  # log-uniform


def test_every_query_answers_with_its_keys_latest_store():
    x = synthetic_tokens(300_000, V, 4).tolist()
    latest, distances = {}, []
    for i in range(len(x) - 2):
        if x[i] == STORE:
            latest[x[i + 1]] = (x[i + 2], i)
        elif x[i] == QUERY:
            value, at = latest[x[i + 1]]
            assert x[i + 2] == value
            distances.append(i - at)
    assert len(distances) > 500 and np.median(distances) > 200 and max(distances) > 2000


def test_bigram_model_is_far_from_an_oracle_that_knows_the_long_range_structure():
    """Long-range structure is worth > 0.25 nats/token on top of the best bigram model."""
    train = synthetic_tokens(300_000, V, 5, "train").astype(np.int64)
    val = synthetic_tokens(100_000, V, 5, "val").astype(np.int64)
    counts = np.bincount(train[:-1] * V + train[1:], minlength=V * V).reshape(V, V) + 0.01
    logp = np.log(counts / counts.sum(1, keepdims=True))
    nll = -logp[val[:-1], val[1:]]  # (N - 1,) loss of predicting val[t + 1] from val[t]
    known = np.zeros(len(val), dtype=bool)  # tokens the oracle predicts exactly
    starts, _ = repeated_ngrams(val)
    for j in range(12):
        known[starts + j] = True
    known[np.flatnonzero(val[:-2] == QUERY) + 2] = True
    oracle = np.where(known[1:], 0.0, nll)
    assert 1.5 < nll.mean() < 3.5  # the background is learnable, not trivial
    assert nll.mean() - oracle.mean() > 0.25


def test_shard_round_trip_both_formats(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 10_000).astype(np.uint16)
    write_shard(tmp_path / "a.bin", tokens)
    header = np.fromfile(tmp_path / "a.bin", dtype=np.int32, count=256)
    assert header[:3].tolist() == [20240520, 1, 10_000]
    tokens.tofile(tmp_path / "raw.bin")  # nanoGPT: bare uint16
    for name in ("a.bin", "raw.bin"):
        back = read_shard(tmp_path / name)
        assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    with pytest.raises(ValueError, match="do not fit uint16"):
        write_shard(tmp_path / "b.bin", np.array([70000]))
    with open(tmp_path / "a.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="header says 10000 tokens"):
        read_shard(tmp_path / "a.bin")


def test_batch_rows_are_independent_windows_and_y_is_x_shifted():
    tokens = np.arange(60_000, dtype=np.uint16)  # token = position: windows are readable
    x, y = get_batch(tokens, 32, 64, np.random.default_rng(0))
    assert x.shape == y.shape == (32, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # the next token of each position
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(32, 63, dtype=torch.int64))  # windows
    continues = (x[1:, 0] == x[:-1, -1] + 1).float().mean()  # row b + 1 continuing row b
    assert continues < 0.1 and len(set(x[:, 0].tolist())) > 28


def test_windows_never_cross_shards_and_cover_all_of_them():
    shards = [np.full(100, 1, np.uint16), np.full(10, 2, np.uint16), np.full(300, 3, np.uint16)]
    x, _ = get_batch(shards, 2000, 16, np.random.default_rng(0))
    assert all(len(set(row)) == 1 for row in x.tolist())  # one shard per row
    assert set(x[:, 0].tolist()) == {1, 3}  # the 10-token shard holds no 17-token window
    assert 0.15 < (x[:, 0] == 1).float().mean() < 0.3  # ~ 84 of 368 windows


def test_sampler_state_resumes_the_batch_sequence_exactly():
    tokens = synthetic_tokens(50_000, V, 0)
    a = BatchSampler(tokens, 4, 32, seed=7)
    first = [a.next_batch() for _ in range(3)]
    buf = io.BytesIO()
    torch.save({"sampler": a.state_dict()}, buf)  # as in a checkpoint
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["sampler"]
    rest = [a.next_batch() for _ in range(5)]
    b = BatchSampler(tokens, 4, 32, seed=123)  # a fresh sampler, e.g. in a resumed process
    b.load_state_dict(state)
    assert b.seed == 7 and b.batches == 3
    resumed = [b.next_batch() for _ in range(5)]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(rest, resumed, strict=True))
    again = BatchSampler(tokens, 4, 32, seed=7)  # same seed, same sequence
    assert all(torch.equal(p[0], again.next_batch()[0]) for p in first)
    other = BatchSampler(tokens, 4, 32, seed=8).next_batch()[0]
    assert not torch.equal(first[0][0], other)


def test_eval_windows_are_fixed():
    tokens = synthetic_tokens(20_000, V, 0, "val")
    (xa, ya), (xb, yb) = eval_windows(tokens, 64, 640), eval_windows(tokens, 64, 640)
    assert xa.shape == ya.shape == (10, 64)  # 640 tokens // 64
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(xa[:, 1:], ya[:, :-1])  # y is x shifted by one
    assert not torch.equal(xa[0], xa[1])
    assert eval_windows(tokens, 64, 10)[0].shape == (1, 64)  # at least one window


def test_build_data_synthetic_reuses_the_cached_corpus():
    a = build_data(
        "synthetic", seq_len=128, vocab_size=V, seed=9, n_train_tokens=30_000, n_val_tokens=5_000
    )
    b = build_data(
        "synthetic", seq_len=256, vocab_size=V, seed=9, n_train_tokens=30_000, n_val_tokens=5_000
    )
    assert a.train is b.train and a.vocab_size == V and len(a.val) == 5_000
    assert not np.array_equal(a.train[:5_000], a.val)  # different streams


@pytest.mark.parametrize(
    "kwargs, key, words",
    [
        ({"name": "nope"}, "data.name", "synthetic, tokens"),
        ({"name": "tokens", "path": None}, "data.path", "data=tokens needs"),
        ({"name": "tokens", "path": "/nonexistent/shards"}, "data.path", "no such directory"),
        ({"name": "tokens", "path": "EMPTY"}, "data.path", "no *train*.bin shards"),
        ({"name": "tokens", "path": "SHORT"}, "seq.len", "the longest"),
        ({"name": "tokens", "path": "OK", "model_vocab_size": 256}, "model.vocab_size", ">= 300"),
        ({"name": "synthetic", "n_val_tokens": 100}, "data.n_val_tokens", "seq.len + 1 = 129"),
        ({"name": "synthetic", "vocab_size": 8}, "data.vocab_size", "[32, 65536]"),
    ],
)
def test_build_data_errors_name_the_key(kwargs, key, words, tmp_path):
    for name, n in (("EMPTY", 0), ("SHORT", 100), ("OK", 1000)):
        (tmp_path / name).mkdir()
        if n:
            for split in ("train", "val"):
                write_shard(tmp_path / name / f"{split}_000000.bin", np.arange(n) % 300)
    if kwargs.get("path") in ("EMPTY", "SHORT", "OK"):
        kwargs["path"] = tmp_path / kwargs["path"]
    with pytest.raises(ConfigError) as e:
        build_data(**{"seq_len": 128, **kwargs})
    assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)


def test_build_data_from_a_run_config(make_cfg, tmp_path):
    data = build_run_data(make_cfg(tracking=False))  # conftest: 50,000 / 10,000 synthetic tokens
    assert (len(data.train), len(data.val), data.vocab_size) == (50_000, 10_000, 512)
    for split in ("train", "val"):  # nanoGPT layout, ids up to 599
        (np.arange(5000) % 600).astype(np.uint16).tofile(tmp_path / f"{split}.bin")
    with pytest.raises(ConfigError, match="model.vocab_size=512"):
        check_data(make_cfg("data=tokens", f"data.path={tmp_path}", tracking=False))
    data = build_run_data(make_cfg("data=tokens", f"data.path={tmp_path}", "model.vocab_size=600"))
    assert isinstance(data.train, np.memmap) and data.vocab_size == 600


def test_check_vocab():
    check_vocab(50257, 50304)
    with pytest.raises(ValueError, match="model.vocab_size=50000.*>= 50257"):
        check_vocab(50257, 50000)


def bln_prepare(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "bln_sweeps.prepare", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_prepare_synthetic_reproduces_data_synthetic(tmp_path):
    out = tmp_path / "synth"
    args = "--tokens 30000 --val-tokens 4000 --vocab 100 --seed 2".split()
    p = bln_prepare("synthetic", "--out", out, *args)
    assert p.returncode == 0, p.stderr
    shards = build_data("tokens", seq_len=128, path=out, model_vocab_size=100)
    ref = build_data(
        "synthetic", seq_len=128, vocab_size=100, seed=2, n_train_tokens=30_000, n_val_tokens=4_000
    )
    assert np.array_equal(shards.train, ref.train) and np.array_equal(shards.val, ref.val)
    assert shards.vocab_size == 100
    again = bln_prepare("synthetic", "--out", out)  # never overwrites shards
    assert again.returncode == 2 and "already holds shards" in again.stderr


def test_prepare_text_with_byte_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello wörld\n" * 2000)
    (tmp_path / "b.txt").write_text("second file\n" * 500)
    out = tmp_path / "shards"
    args = "a.txt b.txt --tokenizer byte --val-fraction 0.1".split()
    p = bln_prepare("text", *args, "--out", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    train, val = read_shard(out / "train_000000.bin"), read_shard(out / "val_000000.bin")
    tokens = np.concatenate([train, val])
    assert tokens[0] == 256 and bytes(tokens[1:13].astype(np.uint8)) == "hello wörld".encode()
    n = 2 + len("hello wörld\n".encode()) * 2000 + len("second file\n") * 500  # + an EOT per file
    meta = json.loads((out / "meta.json").read_text())
    assert len(tokens) == n and meta["vocab_size"] == 257 and meta["tokenizer"] == "byte"
    assert meta["val_tokens"] == len(val) == round(0.1 * n)
    assert build_data("tokens", seq_len=64, path=out, model_vocab_size=257).vocab_size == 257


@pytest.mark.parametrize(
    "args, words",
    [
        (["text", "missing.txt", "--out", "o", "--tokenizer", "byte"], "missing.txt"),
        (["text", "--out", "o"], "FILE"),
        (["synthetic", "--out", "o", "--vocab", "10"], "--vocab=10"),
        (["text", "x.txt", "--out", "o", "--val-fraction", "1.5"], "--val-fraction=1.5"),
        (["text", "x.txt", "--out", "o", "--tokenizer", "bpe"], "byte"),
        (["nope"], "synthetic"),
    ],
)
def test_prepare_bad_input_exits_2_with_one_line(args, words, tmp_path):
    (tmp_path / "x.txt").write_text("x")
    p = bln_prepare(*args, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and words in lines[0], p.stderr
    assert not (tmp_path / "o").exists()


def test_prepare_without_datasets_or_bpe_files_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert main(["hf", "some/dataset", "--out", str(tmp_path / "o")]) == 2
    assert "pip install datasets" in capsys.readouterr().err

    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    (tmp_path / "x.txt").write_text("x")
    assert main(["text", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer byte" in err and len(err.strip().splitlines()) == 1

    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    fake = SimpleNamespace(n_vocab=50257, eot_token=50256, encode_ordinary=lambda s: [0])
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    assert main(["text", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_prepare_help_does_not_import_torch():
    code = "import sys, bln_sweeps.prepare; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert bln_prepare("--help").returncode == 0
