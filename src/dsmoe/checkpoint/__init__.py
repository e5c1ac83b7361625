"""Checkpoints in the Hugging Face layout: name tables, safetensors shards, FP8 block dequantisation."""

from .hf import load_pretrained, save_pretrained
from .shards import CheckpointError

__all__ = ["CheckpointError", "load_pretrained", "save_pretrained"]
