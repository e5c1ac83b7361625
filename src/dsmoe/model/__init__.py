"""Single-device model code: no torch.distributed, no globals."""

from .moe import MoE, Router, Routing
from .transformer import Block, Transformer

__all__ = ["Block", "MoE", "Router", "Routing", "Transformer"]
