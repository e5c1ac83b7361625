"""`dsmoe tokenize`: a corpus into memory-mapped token shards that `dsmoe train --data SHARDS/` streams."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import CLIError, _positive_int


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    from ..train.shards import DEFAULT_SHARD_TOKENS

    p = sub.add_parser("tokenize", help="tokenize a corpus into token shards for dsmoe train --data SHARDS/",
                       description="Tokenize a corpus once with an existing tokenizer (a checkpoint's, or a "
                                   "training run's) into uint16/uint32 memory-mapped shards with an index, split "
                                   "into training and validation documents as dsmoe train splits them. Training "
                                   "then streams the shards without holding the corpus in memory.")
    p.add_argument("--data", type=Path, required=True, metavar="SRC",
                   help="a folder of .txt/.py/.md files, one such file, a .jsonl or a .parquet")
    p.add_argument("--tokenizer", type=Path, required=True, metavar="DIR",
                   help="a tokenizer.json or a directory holding one (its generation_config.json / config.json "
                        "give the BOS and EOS ids; else <|endoftext|>)")
    p.add_argument("--out", type=Path, required=True, metavar="SHARDS", help="output folder")
    p.add_argument("--field", default="text", metavar="NAME",
                   help="the text's field in a .jsonl, or column in a .parquet (default: text)")
    p.add_argument("--strict-data", action="store_true",
                   help="refuse a file that is not valid UTF-8 (default: skip it with a warning naming it)")
    p.add_argument("--shard-tokens", type=_positive_int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,})")
    p.set_defaults(run=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> int:
    from ..train.data import DataError
    from ..train.shards import write_shards

    began = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= 5 or done == total:
            last[0] = now
            print(f"{done:,}/{total:,} documents", file=sys.stderr, flush=True)

    try:
        index = write_shards(args.data, args.tokenizer, args.out, args.field, args.strict_data,
                             warn=lambda message: print(f"warning: {message}", file=sys.stderr, flush=True),
                             shard_tokens=args.shard_tokens, on_progress=progress)
    except DataError as err:
        raise CLIError(str(err)) from None
    splits = index["splits"]
    print(f"{args.out}: {splits['train']['tokens']:,} training tokens ({splits['train']['documents']:,} documents), "
          f"{splits['val']['tokens']:,} validation tokens ({splits['val']['documents']:,} documents), "
          f"{index['dtype']}, {len(splits['train']['shards']) + len(splits['val']['shards'])} shard files, "
          f"{len(index['skipped'])} skipped, {time.perf_counter() - began:.1f}s", file=sys.stderr)
    return 0
