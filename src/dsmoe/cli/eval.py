"""`dsmoe eval`: perplexity and bits per byte of a model on held-out text with its own tokenizer, the expert
load per MoE layer, and the MTP draft acceptance per depth."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import DTYPES, CLIError, _positive_int, add_device_argument, resolve_device


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, bits per byte, expert load and MTP acceptance on held-out text",
                       description="Evaluate a checkpoint directory (config.json, safetensors, tokenizer.json) on "
                                   "text: a .txt/.py/.md file, a folder of them, or a .jsonl with a 'text' field. "
                                   "Documents are tokenized with the model's tokenizer and joined with its "
                                   "end-of-text token, as training joins them.")
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--data", type=Path, required=True, metavar="PATH", help="held-out text")
    p.add_argument("--seq-len", type=_positive_int, default=None, metavar="T",
                   help="window length in tokens (default: min(1024, max_position_embeddings))")
    p.add_argument("--stride", type=_positive_int, default=None, metavar="S",
                   help="new tokens each window scores after the first, the rest of it being context "
                        "(default and at most: --seq-len - 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="(default: fp32)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    add_device_argument(p)
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_pretrained
    from ..train import data, tokenizer
    from ..train.prepare import checkpoint_token_ids
    from ..train.text_eval import evaluate_tokens

    if not args.model.is_dir():
        raise CLIError(f"--model {args.model}: no such model directory")
    device = resolve_device(args.device)
    try:
        tok = tokenizer.load_tokenizer(args.model)
        docs = data.load_corpus(args.data)
        model = load_pretrained(args.model, dtype=getattr(torch, DTYPES[args.dtype]), device=device)
        eos, bos, _ = checkpoint_token_ids(args.model, model.config, tok)
        ids = data.encode_corpus(docs, tok, eos, bos_id=bos).tokens
    except data.DataError as err:
        raise CLIError(str(err)) from None
    if int(ids.max()) >= model.config.vocab_size:
        raise CLIError(f"{args.model}: its tokenizer produced id {int(ids.max())}, outside the model's "
                       f"{model.config.vocab_size}-token embedding")
    seq_len = args.seq_len or min(1024, model.config.max_position_embeddings)
    if seq_len > model.config.max_position_embeddings:
        raise CLIError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                       f"{model.config.max_position_embeddings}")
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    result = evaluate_tokens(model, ids, n_bytes, seq_len, args.stride or seq_len - 1)
    figures = result.as_dict()
    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(args.data), "seq_len": seq_len,
                          "stride": args.stride or seq_len - 1, **figures}))
        return 0
    print(f"{args.model} on {args.data}: {result.tokens:,} tokens scored, {n_bytes:,} bytes "
          f"(windows of {seq_len}, stride {args.stride or seq_len - 1})")
    print(f"perplexity {result.perplexity:.4f}  loss {result.loss:.4f} nats/token  "
          f"bits per byte {result.bits_per_byte:.4f}")
    config = model.config
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe and config.is_moe_layer(i)]
    for layer, vio, dead in zip(layers, figures["max_vio"], figures["dead_experts"]):
        print(f"layer {layer:>3}: MaxVio {vio:.3f}  dead experts {dead}/{config.n_routed_experts}")
    for k, (acc, hit) in enumerate(zip(figures.get("mtp_acceptance", []), figures.get("mtp_accuracy", [])), 1):
        print(f"MTP depth {k}: draft acceptance {acc:.1%} (drafts equal to the model's greedy token), "
              f"accuracy {hit:.1%} against the text")
    sys.stdout.flush()
    return 0
