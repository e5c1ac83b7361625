"""`dsmoe generate`: stream text from a checkpoint directory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import DTYPES, CLIError, _non_negative_float, _positive_int, add_device_argument, resolve_device

# ---------------------------------------------------------------------------------------------- generate

def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream text from a checkpoint directory",
                       description="Generate text with a Hugging Face-layout checkpoint and its tokenizer.json. "
                                   "Text streams to stdout; tokens/s goes to stderr at the end.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (config.json, "
                   "*.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N",
                   help="default: generation_config.json's max_new_tokens, else 128")
    p.add_argument("--temperature", type=_non_negative_float, default=None, metavar="T",
                   help="0 = greedy. Default, like --top-k and --top-p: the checkpoint's generation_config.json "
                        "(sampling only when it says do_sample: true), else greedy")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as a user message through the checkpoint's chat template "
                        "(tokenizer_config.json), rendered as `dsmoe serve` and transformers render it")
    p.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message first")
    p.add_argument("--speculative", action="store_true",
                   help="greedy decoding with the MTP module drafting one token ahead (DeepSeek-V3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--ep", type=_positive_int, default=1, metavar="N",
                   help="shard the routed experts over N processes (launch with torchrun --nproc_per_node N)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay decode steps from a CUDA graph (CUDA, bf16; untested until scripts/gpu_check.sh passes)")
    p.add_argument("--prefill-chunk", type=_positive_int, default=None, metavar="N",
                   help="prefill the prompt N positions at a time (bounds the peak memory of a long prompt; "
                        "default: one forward)")
    p.add_argument("--compile", action="store_true",
                   help="decode steps through torch.compile (for models the default CPU kernel step does not "
                        "cover; no faster than it otherwise). The first step compiles (~15-50 s on 2 cores), and "
                        "the tokens/s reported includes that")
    add_device_argument(p)
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from .. import parallel
    from ..checkpoint import load_pretrained
    from ..generate import GenerationStats, stream
    from ..train.tokenizer import EOT_TOKEN, load_tokenizer

    if args.speculative and args.temperature not in (None, 0):
        raise CLIError("--speculative decodes greedily: leave --temperature at 0")
    if args.speculative and args.ep > 1:
        raise CLIError("--speculative is not supported with --ep")
    directory = Path(args.model)
    if not directory.is_dir():
        raise CLIError(f"{directory}: no such model directory")
    # under torchrun each process takes the GPU of its local rank; NCCL then carries the collectives
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    tokenizer = load_tokenizer(directory)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model = load_pretrained(directory, dtype=dtype, device=device)
    info = parallel.init_distributed(args.ep, model.config.n_routed_experts,
                                     backend="nccl" if device.type == "cuda" else "gloo")
    sync = None
    if info.ep_size > 1:  # pure data-parallel replicas (no --ep) just generate the same text independently
        parallel.shard_experts(model, info)
        sync = lambda t: parallel.broadcast_from_main(t, info)  # noqa: E731
    out = sys.stdout if info.is_main else open(os.devnull, "w")
    if args.system is not None and not args.chat:
        raise CLIError("--system needs --chat")
    if args.chat:
        ids = _chat_prompt_ids(directory, tokenizer, args.prompt, args.system)
    else:
        ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise CLIError("the prompt encodes to no tokens")
    gen = model.generation_config  # generation_config.json, None when the checkpoint has none
    # Stop ids: generation_config.json first (config.json's eos_token_id is often null or stale in
    # fine-tunes), then config.json, then the tokenizer's end-of-text token.
    eos = (gen.eos_token_id if gen is not None and gen.eos_token_id else None) or model.config.eos_token_id
    if eos is None:
        eos = tokenizer.token_to_id(EOT_TOKEN)  # None (never stop early) for a tokenizer without it
    # Sampling: what the user gave, else the checkpoint's defaults, else greedy (always greedy when speculative).
    defaults = gen.sampling_defaults() if gen is not None and not args.speculative else {}
    temperature = args.temperature if args.temperature is not None else defaults.get("temperature", 0.0)
    top_k = args.top_k if args.top_k is not None else defaults.get("top_k")
    top_p = args.top_p if args.top_p is not None else defaults.get("top_p")
    max_new = args.max_new_tokens or (gen.max_new_tokens if gen is not None and gen.max_new_tokens else 128)
    stats = GenerationStats()
    if model.embed.weight.device.type == "cpu":
        from ..ops.cpu_kernels import kernels

        kernels()  # built (once per machine, ~45 s) or loaded before the clock starts: tokens/s is decoding only
    began = time.perf_counter()
    new: list[int] = []
    shown = ""
    for tokens in stream(model, torch.tensor([ids]), max_new, temperature, top_k, top_p, eos, args.seed,
                         args.speculative, stats, sync, cuda_graph=args.cuda_graph,
                         compiled=args.compile, prefill_chunk=args.prefill_chunk):
        new += tokens[0].tolist()
        # Decode everything so far and print the new suffix: byte-level BPE tokens can split a
        # multi-byte character, which decodes to U+FFFD until its last byte arrives.
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    out.write(text[len(shown):] + "\n")
    elapsed = time.perf_counter() - began
    line = f"{len(new)} tokens in {elapsed:.2f}s: {stats.tokens_per_s:.1f} tokens/s"
    if args.speculative:
        line += f", MTP draft acceptance {100 * stats.acceptance_rate:.0f}% ({stats.accepted}/{stats.drafted})"
    if info.is_main:
        print(line, file=sys.stderr)
    parallel.destroy()
    return 0


def _chat_prompt_ids(directory: Path, tokenizer, prompt: str, system: str | None) -> list[int]:
    """The prompt rendered by the checkpoint's chat template with a generation prompt, tokenised without
    adding special tokens (the template writes them), as the server's /v1/chat/completions does."""
    from ..serve.chat import ChatTemplate, ChatTemplateError

    template = ChatTemplate.from_directory(directory)
    if template is None:
        raise CLIError(f"{directory}: no chat template (tokenizer_config.json chat_template or chat_template.jinja); "
                       "drop --chat")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": prompt}]
    try:
        text = template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as err:
        raise CLIError(f"the chat template refused the messages: {err}") from None
    return tokenizer.encode(text, add_special_tokens=False).ids
