"""Checkpoints in the Hugging Face layout: name tables, safetensors shards, FP8 block dequantisation,
generation_config.json."""

from .generation_config import GenerationConfig, read_generation_config, write_generation_config
from .hf import load_pretrained, save_pretrained
from .shards import CheckpointError

__all__ = ["CheckpointError", "GenerationConfig", "load_pretrained", "read_generation_config", "save_pretrained",
           "write_generation_config"]
