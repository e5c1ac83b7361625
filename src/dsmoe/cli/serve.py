"""`dsmoe serve`: an OpenAI-compatible HTTP server for a checkpoint directory (uvicorn + FastAPI)."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

from .common import DTYPES, CLIError, _positive_int, add_device_argument, resolve_device


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value}")
    return value


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                   "/metrics for a checkpoint directory (config.json, *.safetensors, "
                                   "tokenizer.json; optional tokenizer_config.json chat_template and "
                                   "generation_config.json). SIGTERM or Ctrl-C: stop admitting, finish the "
                                   "requests in flight, exit 0.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the directory's name)")
    p.add_argument("--cache-memory", default=None, metavar="SIZE",
                   help="KV/latent cache pool size, e.g. 2GiB or 512MB (continuous-batching engine; default: 1GiB)")
    p.add_argument("--max-running", type=_positive_int, default=64, metavar="N",
                   help="sequences in the running batch at most (default 64)")
    p.add_argument("--max-waiting", type=_positive_int, default=256, metavar="N",
                   help="queued requests at most; beyond, HTTP 429 with Retry-After (default 256)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    add_device_argument(p)
    p.add_argument("--speculative", action="store_true",
                   help="decode greedy requests with the MTP module drafting one token ahead (DeepSeek-V3); "
                        "the same tokens as plain greedy decoding")
    p.set_defaults(run=_run_serve)


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise CLIError(f"--host {host}: cannot resolve ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as err:
            raise CLIError(f"cannot listen on {host}:{port} ({err.strerror})") from None


def _run_serve(args: argparse.Namespace) -> int:
    directory = Path(args.model)
    if not directory.is_dir():
        raise CLIError(f"{directory}: no such model directory")
    if args.api_key is not None and not args.api_key.strip():
        raise CLIError("--api-key must not be empty")
    cache_bytes = None
    if args.cache_memory is not None:
        from ..checkpoint.shards import parse_size
        try:
            cache_bytes = parse_size(args.cache_memory)
        except ValueError:
            raise CLIError(f"--cache-memory: cannot read {args.cache_memory!r} (use e.g. 2GiB, 512MB)") from None
    _check_port(args.host, args.port)
    device = resolve_device(args.device)

    import torch
    import uvicorn

    from ..checkpoint import load_pretrained
    from ..serve.api import create_app
    from ..serve.assets import load_text_assets
    from ..serve.engines import make_engine

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model = load_pretrained(directory, dtype=dtype, device=device)
    assets = load_text_assets(directory, model.config)
    engine, kind = make_engine(model, cache_bytes=cache_bytes, max_running=args.max_running,
                               max_waiting=args.max_waiting, speculative=args.speculative)
    name = args.served_model_name or directory.resolve().name
    app = create_app(engine, assets.tokenizer, name, chat_template=assets.chat_template,
                     eos_token_ids=assets.eos_token_ids, sampling_defaults=assets.sampling_defaults,
                     default_max_tokens=assets.default_max_tokens, vocab_size=model.config.vocab_size,
                     api_key=args.api_key, speculative=args.speculative)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: stop admitting at once, then uvicorn drains
            app.state.draining = True
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=None))
    # uvicorn re-raises the signal it shut down on once it is done; handled here, that is a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"dsmoe: serving {name!r} on http://{args.host}:{args.port}/v1 ({kind}; context "
          f"{engine.max_context} tokens; chat template: {'yes' if assets.chat_template else 'none'})",
          file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        engine.shutdown(drain=True)
    print("dsmoe: server stopped", file=sys.stderr, flush=True)
    return 0
