"""Serving: a continuous-batching engine over a paged cache, and an OpenAI-compatible HTTP API on top.

Three layers, each knowing only the one below (see docs/architecture.md):
api.py (HTTP, text, chat templates, stop strings) -> engine (scheduler, requests, block tables; token ids
only) -> runner (one model step: tensors in, logits out). `protocol.py` is the contract between the HTTP
layer and the engine.
"""
