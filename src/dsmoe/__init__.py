"""dsmoe: DeepSeek V1/V2/V3/V3.2/V4 and Mixtral Mixture-of-Experts models in PyTorch."""

from ._startup import command_interrupt_guard, spin_openmp_threads_for_decoding

spin_openmp_threads_for_decoding()  # before torch loads its OpenMP runtime

with command_interrupt_guard():  # Ctrl-C during the imports of the `dsmoe` command: one line, no traceback
    from .checkpoint import load_pretrained, save_pretrained
    from .config import ModelConfig
    from .generate import GenerationStats
    from .generate import generate as _generate
    from .model import Transformer
    from .presets import get_preset

# `dsmoe.generate(...)` is the function; the module stays importable as `from dsmoe.generate import ...`.
generate = _generate

__all__ = ["GenerationStats", "ModelConfig", "Transformer", "generate", "get_preset", "load_pretrained",
           "save_pretrained"]
__version__ = "0.1.0"
