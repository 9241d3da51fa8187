"""`bln-prepare`: text files, a Hugging Face dataset or the synthetic corpus -> token shards.

    bln-prepare synthetic --out shards/synth          # the built-in corpus, written as shards
    bln-prepare text book.txt notes.txt --out shards/books --tokenizer byte
    bln-prepare hf roneneldan/TinyStories --out shards/tiny --max-docs 100000   # needs `datasets`

The shards are llm.c's format (bln_sweeps.data.write_shard), read by `data=tokens data.path=DIR`.
Documents are tokenized into one temporary file and the last `--val-fraction` of the tokens
becomes the val split, as nanoGPT does. Torch-free: `bln-prepare --help` stays light.
"""

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bln_sweeps.config import ConfigError, DataConfig
from bln_sweeps.data import SHARD_TOKENS, write_shard
from bln_sweeps.synthetic import MIN_VOCAB, synthetic_tokens


@dataclass(frozen=True)
class Tokenizer:
    name: str
    vocab_size: int
    eot: int  # prepended to every document, as llm.c does
    encode: Callable[[str | bytes], np.ndarray]  # text or UTF-8 bytes -> uint16 ids


TOKENIZERS = ("gpt2", "byte")


def load_tokenizer(name: str) -> Tokenizer:
    if name == "byte":

        def encode_bytes(text: str | bytes) -> np.ndarray:
            data = text.encode("utf-8") if isinstance(text, str) else text
            return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

        return Tokenizer("byte", 257, 256, encode_bytes)
    if name == "gpt2":
        import tiktoken

        try:
            enc = tiktoken.get_encoding("gpt2")  # downloads the BPE files on first use
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(
                "--tokenizer",
                name,
                f"tiktoken could not load GPT-2's BPE files (downloaded on first use; offline, use"
                f" --tokenizer byte): {first}",
            ) from None

        def encode_bpe(text: str | bytes) -> np.ndarray:
            text = text.decode("utf-8") if isinstance(text, bytes) else text
            return np.array(enc.encode_ordinary(text), dtype=np.uint16)

        return Tokenizer("gpt2", enc.n_vocab, enc.eot_token, encode_bpe)
    raise ConfigError("--tokenizer", name, f"valid: {', '.join(TOKENIZERS)}")


def file_pieces(path: Path, text: bool) -> Iterator[str | bytes]:
    """A file in ~1 MB pieces cut at line ends, so a large file never sits in memory as ids;
    decoded as UTF-8 when `text` (a character never spans a line end, so pieces decode alone).
    GPT-2's BPE may split a run of newlines differently at a cut; decoding is still exact."""
    with open(path, "rb") as f:
        while lines := f.readlines(1 << 20):
            piece = b"".join(lines)
            if not text:
                yield piece
                continue
            try:
                yield piece.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    "FILE", str(path), f"not UTF-8 text ({e.reason}); try --tokenizer byte"
                ) from None


def write_splits(out: Path, train: np.ndarray, val: np.ndarray, meta: dict) -> list[Path]:
    """train_NNNNNN.bin / val_NNNNNN.bin shards of at most SHARD_TOKENS, and meta.json."""
    paths = []
    for split, tokens in (("train", train), ("val", val)):
        for i, at in enumerate(range(0, len(tokens), SHARD_TOKENS)):
            paths.append(out / f"{split}_{i:06d}.bin")
            write_shard(paths[-1], tokens[at : at + SHARD_TOKENS])
    meta = {**meta, "train_tokens": len(train), "val_tokens": len(val), "format": "llm.c"}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return paths


def prepare_documents(
    docs: Iterable[Iterable[str | bytes]],
    tokenizer: Tokenizer,
    out: Path,
    val_fraction: float,
    meta: dict,
) -> list[Path]:
    """Tokenize documents (each an iterable of pieces) into one temporary uint16 file, then cut the
    last `val_fraction` of the tokens off as the val split (nanoGPT's convention)."""
    tmp = out / ".tokens.tmp"
    try:
        with open(tmp, "wb") as f:
            for doc in docs:
                np.array([tokenizer.eot], dtype=np.uint16).tofile(f)
                for piece in doc:
                    tokenizer.encode(piece).tofile(f)
        tokens = np.memmap(tmp, dtype=np.uint16, mode="r")  # at least one EOT: never empty
        n_val = round(len(tokens) * val_fraction)
        if n_val == 0 or n_val == len(tokens):
            raise ConfigError(
                "--val-fraction", val_fraction, f"leaves an empty split of {len(tokens)} tokens"
            )
        meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, **meta}
        return write_splits(out, tokens[:-n_val], tokens[-n_val:], meta)
    finally:
        tmp.unlink(missing_ok=True)


def hf_documents(
    dataset: str, config: str | None, split: str, field: str, max_docs: int | None
) -> Iterator[list[str]]:
    """Stream a Hugging Face dataset's `field` as documents. Imports and opens it now, so a
    missing package or an unreachable hub fails before anything is written."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "hf", dataset, "needs the `datasets` package and internet: pip install datasets"
        ) from None
    try:
        rows = datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError("hf", dataset, f"could not load it: {first}") from None

    def documents() -> Iterator[list[str]]:
        for i, row in enumerate(rows):
            if max_docs is not None and i >= max_docs:
                return
            if field not in row:
                raise ConfigError("--text-field", field, f"columns: {', '.join(row)}")
            yield [row[field]]

    return documents()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage first
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog="bln-prepare",
        description="Write token shards for data=tokens data.path=DIR.",
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    text = sub.add_parser("text", help="tokenize local text files (one document each)")
    text.add_argument("files", nargs="+", type=Path, metavar="FILE")
    hf = sub.add_parser("hf", help="tokenize a Hugging Face dataset (needs `datasets`, internet)")
    hf.add_argument("dataset")
    hf.add_argument("--name", default=None, help="dataset config name")
    hf.add_argument("--split", default="train", help="dataset split to read (default: train)")
    hf.add_argument("--text-field", default="text")
    hf.add_argument("--max-docs", type=int, default=None)
    for s in (text, hf):
        s.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2")
        s.add_argument("--val-fraction", type=float, default=0.05)
    d = DataConfig()
    synth = sub.add_parser("synthetic", help="the synthetic corpus data=synthetic generates")
    synth.add_argument("--tokens", type=int, default=d.n_train_tokens, help="train tokens")
    synth.add_argument("--val-tokens", type=int, default=d.n_val_tokens)
    synth.add_argument("--vocab", type=int, default=d.vocab_size)
    synth.add_argument("--seed", type=int, default=d.seed)
    for s in (text, hf, synth):
        s.add_argument("--out", type=Path, required=True, help="shard directory (data.path)")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> list[Path]:
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError("--out", str(args.out), "is a file, not a directory")
    old = sorted(p.name for p in [*args.out.glob("*train*.bin"), *args.out.glob("*val*.bin")])
    if old:
        raise ConfigError("--out", str(args.out), f"already holds shards ({old[0]}, ...)")
    if args.command == "synthetic":
        for key, n in (("--tokens", args.tokens), ("--val-tokens", args.val_tokens)):
            if n <= 0:
                raise ConfigError(key, n, "must be > 0")
        if not MIN_VOCAB <= args.vocab <= 2**16:
            raise ConfigError("--vocab", args.vocab, f"must be in [{MIN_VOCAB}, 65536]")
        train = synthetic_tokens(args.tokens, args.vocab, args.seed, "train")  # checks --vocab
        val = synthetic_tokens(args.val_tokens, args.vocab, args.seed, "val")
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"tokenizer": "synthetic", "vocab_size": args.vocab, "seed": args.seed}
        return write_splits(args.out, train, val, meta)

    if not 0 < args.val_fraction < 1:
        raise ConfigError("--val-fraction", args.val_fraction, "must be in (0, 1)")
    if args.command == "text":
        for f in args.files:
            if not f.is_file():
                raise ConfigError("FILE", str(f), "no such file")
        docs = (file_pieces(f, text=args.tokenizer != "byte") for f in args.files)
        source = {"files": [str(f) for f in args.files]}
    else:
        docs = hf_documents(args.dataset, args.name, args.split, args.text_field, args.max_docs)
        source = {"dataset": args.dataset, "name": args.name, "split": args.split}
    tokenizer = load_tokenizer(args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    return prepare_documents(docs, tokenizer, args.out, args.val_fraction, source)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = prepare(args)
    except ValueError as e:  # ConfigError: bad input, one line
        print(f"bln-prepare: error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((args.out / "meta.json").read_text())
    print(
        f"wrote {len(paths)} shards to {args.out}: {meta['train_tokens']:,} train and"
        f" {meta['val_tokens']:,} val tokens, vocab_size {meta['vocab_size']}"
        f" (use: data=tokens data.path={args.out} model.vocab_size>={meta['vocab_size']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
