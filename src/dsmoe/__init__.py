"""dsmoe: DeepSeek V1/V2/V3 and Mixtral Mixture-of-Experts models in PyTorch."""

from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig
from .model import Transformer
from .presets import get_preset

__all__ = ["ModelConfig", "Transformer", "get_preset", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
