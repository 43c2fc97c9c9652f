#!/usr/bin/env python
"""Train the zh+en SentencePiece tokenizer on a balanced, seeded sample of ../shared/data (reproducible).

Every pretrain and SFT file of the shared data directory contributes at most ``--cap SOURCE=CHARACTERS`` characters
of its *training-split* records (the SHA-1 validation rule of ../shared/data/README.md holds the validation records
out, so the tokenizer is measured on text it never saw). Records are drawn by a seeded Bernoulli pass (probability
cap / characters of the file), so the same flags always give the same sample and the same model. Classical poetry is
capped hard so it does not dominate the Chinese merges; English books are capped so English does not dominate the
vocabulary.

    python scripts/train_tokenizer.py                                  # the shipped recipe -> data/tokenizer_zh_en/
    python scripts/train_tokenizer.py --vocab_size 8192 --output /tmp/tok8k --eval
    python scripts/train_tokenizer.py --cap zh-poetry=2000000 --cap en-gutenberg=0 --output /tmp/x

``--eval`` prints characters per token on the validation records of every file (the numbers of
``nanollada tokenizer stats --validation-only``) and the parameter count of the base preset with that vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanollada.data.records import SHARED_VAL_FRACTION, detect_kind, is_validation, iter_records  # noqa: E402
from nanollada.tokenizer import Tokenizer, record_texts, train_tokenizer  # noqa: E402

# Characters of training-split text drawn from each file (file name without .jsonl.gz): ~9.5 M English and ~6.7 M
# Chinese characters (a Chinese character carries about as much as 2-3 English ones, so this is roughly balanced in
# content; see data/tokenizer_zh_en/README.md for the sweep that chose it). zh-poetry is capped at 0.8 M characters
# so classical poetry does not dominate the Chinese merges.
DEFAULT_CAPS = {
    "en-gutenberg": 8_000_000,
    "en-shakespeare": 300_000,
    "alpaca-en": 1_200_000,
    "zh-modern": 3_000_000,
    "zh-novels": 1_500_000,
    "zh-poetry": 800_000,
    "alpaca-zh": 1_000_000,
    "sharegpt-zh-1k": 400_000,
}
SUBDIRS = ("pretrain", "sft")
BASE_NON_EMBEDDING = 22_553_088  # base preset (d=512, 8 layers) without its tied embedding: params = V*512 + this


def default_data_root() -> str:
    return os.environ.get("NANOLLADA_DATA") or str(REPO.parent / "shared" / "data")


def source_name(path: str | Path) -> str:
    return Path(path).name.split(".")[0]


def language(source: str) -> str:
    """``en`` for en-* / *-en sources, else ``zh``."""
    return "en" if source.startswith("en-") or source.endswith("-en") else "zh"


def data_files(data_root: str) -> list[Path]:
    files = sorted(p for d in SUBDIRS for p in (Path(data_root) / d).glob("*.jsonl*"))
    if not files:
        raise SystemExit(f"no jsonl(.gz) files under {data_root}/{{{','.join(SUBDIRS)}}} (set --data_root)")
    return files


def record_chars(rec: dict) -> int:
    return sum(len(t) for t in record_texts(rec))


def sample_file(path: Path, cap: int, seed: int, out) -> tuple[int, int, int]:
    """Write a seeded sample (~cap characters) of the file's training-split records to ``out`` as {"text"} lines.

    Returns (records written, characters written, training-split characters in the file).
    """
    kind = detect_kind(str(path))
    total = sum(record_chars(r) for k, r in iter_records(str(path), kind)
                if not is_validation(k, SHARED_VAL_FRACTION))
    if cap <= 0 or total == 0:
        return 0, 0, total
    p = min(1.0, cap / total)
    rng = random.Random(f"{seed}|{source_name(path)}")  # str seeds are hashed deterministically (sha512)
    n = chars = 0
    for key, rec in iter_records(str(path), kind):
        if is_validation(key, SHARED_VAL_FRACTION) or rng.random() >= p:
            continue
        for t in record_texts(rec):
            if t:
                out.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        n, chars = n + 1, chars + record_chars(rec)
    return n, chars, total


def validation_texts(path: Path, cache_dir: Path | None) -> list[str]:
    """Texts of the file's validation records (every message of an SFT record), optionally cached as JSON."""
    cached = cache_dir / f"{source_name(path)}.val.json" if cache_dir else None
    if cached and cached.is_file() and cached.stat().st_mtime >= path.stat().st_mtime:
        return json.loads(cached.read_text(encoding="utf-8"))
    kind = detect_kind(str(path))
    texts = [t for k, r in iter_records(str(path), kind) if is_validation(k, SHARED_VAL_FRACTION)
             for t in record_texts(r)]
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    return texts


def chars_per_token(tok: Tokenizer, texts: list[str]) -> tuple[int, int]:
    return sum(len(t) for t in texts), sum(len(ids) for ids in tok.encode_batch(texts))


def evaluate(tok: Tokenizer, files: list[Path], cache_dir: Path | None) -> dict[str, float]:
    """Characters per token on the validation records of each file (same numbers as ``tokenizer stats``)."""
    result = {}
    for f in files:
        c, t = chars_per_token(tok, validation_texts(f, cache_dir))
        result[source_name(f)] = c / max(t, 1)
    return result


def normalise_model(path: Path) -> None:
    """Blank the machine-specific trainer fields (output path, thread count) so the file is byte-reproducible.

    The pieces and scores do not depend on them; the file's hash keys token caches and checkpoint checks.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())
    m.trainer_spec.model_prefix, m.trainer_spec.num_threads = "tokenizer", 1
    path.write_bytes(m.SerializeToString())


def parse_caps(items: list[str]) -> dict[str, int]:
    caps = dict(DEFAULT_CAPS)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--cap wants SOURCE=CHARACTERS, got {item!r}")
        caps[name] = int(float(value))
    return caps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", default=default_data_root(), help="shared data dir (default: $NANOLLADA_DATA, "
                    "else ../shared/data)")
    ap.add_argument("--output", default=str(REPO / "data" / "tokenizer_zh_en"), help="directory for tokenizer.model")
    ap.add_argument("--vocab_size", type=int, default=12000)
    ap.add_argument("--character_coverage", type=float, default=0.999,
                    help="share of sample characters given their own piece; rarer ones use byte fallback")
    ap.add_argument("--no_split_digits", action="store_true", help="let digits merge (default: one piece per digit)")
    ap.add_argument("--cap", action="append", default=[], metavar="SOURCE=CHARS",
                    help=f"characters drawn from a source (repeatable); defaults: {DEFAULT_CAPS}; 0 drops a source")
    ap.add_argument("--default_cap", type=int, default=0, help="cap of sources not listed (default 0: not used)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep_sample", default=None, help="also write the sampled texts to this jsonl file")
    ap.add_argument("--eval", action="store_true", help="print validation characters/token per file afterwards")
    ap.add_argument("--val_cache", default=None, help="directory caching the validation texts between --eval runs")
    ap.add_argument("--eval_only", default=None, metavar="TOKENIZER",
                    help="train nothing: print validation characters/token of this tokenizer model")
    ap.add_argument("--json", default=None, help="append a JSON line with settings and results to this file")
    args = ap.parse_args(argv)

    caps = parse_caps(args.cap)
    files = data_files(args.data_root)
    if args.eval_only:
        print_eval(Tokenizer(args.eval_only), files, args)
        return
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(args.keep_sample) if args.keep_sample else Path(tmp) / "sample.jsonl"
        drawn = {}
        with open(sample, "w", encoding="utf-8") as out:
            for f in files:
                n, c, total = sample_file(f, caps.get(source_name(f), args.default_cap), args.seed, out)
                drawn[source_name(f)] = c
                print(f"[tokenizer] {source_name(f):<16} {n:>7,} records {c:>11,} of {total:>12,} training chars",
                      flush=True)
        en = sum(c for s, c in drawn.items() if language(s) == "en")
        print(f"[tokenizer] sample: {sum(drawn.values()):,} characters ({en:,} English), "
              f"{time.time() - t0:.0f}s; training vocab {args.vocab_size}...", flush=True)
        t1 = time.time()
        path = train_tokenizer([str(sample)], args.output, vocab_size=args.vocab_size,
                               character_coverage=args.character_coverage, seed=args.seed,
                               split_digits=not args.no_split_digits)
    normalise_model(path)
    path.with_suffix(".vocab").unlink(missing_ok=True)  # the piece list is inside the model; keep the directory lean
    tok = Tokenizer(path)
    params = tok.vocab_size * 512 + BASE_NON_EMBEDDING
    print(f"[tokenizer] wrote {path} (vocab {tok.vocab_size}, trained in {time.time() - t1:.0f}s); base preset "
          f"{params / 1e6:.2f}M parameters", flush=True)
    if args.eval:
        print_eval(tok, files, args, caps)


def print_eval(tok: Tokenizer, files: list[Path], args, caps: dict | None = None) -> None:
    res = evaluate(tok, files, Path(args.val_cache) if args.val_cache else None)
    print("| " + " | ".join(res) + " |\n|" + "---|" * len(res) + "\n| " +
          " | ".join(f"{v:.3f}" for v in res.values()) + " |", flush=True)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"tokenizer": str(tok.path), "vocab_size": tok.vocab_size,
                                 "character_coverage": args.character_coverage,
                                 "split_digits": not args.no_split_digits, "caps": caps, "seed": args.seed,
                                 "base_params": tok.vocab_size * 512 + BASE_NON_EMBEDDING,
                                 "chars_per_token": res}) + "\n")


if __name__ == "__main__":
    main()
