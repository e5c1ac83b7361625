"""Fine-tuning sources for the training and evaluation tests (test-only): tiny checkpoints written by
transformers with a tokenizer of their own."""

from __future__ import annotations

from pathlib import Path

import torch
from hf_models import CASES
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsmoe.bench import spread_norms_and_router_biases

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek's spelling: not <|endoftext|>


def tokenizer_for(directory: Path, corpus: Path) -> Tokenizer:
    """A checkpoint's own tokenizer: byte-level BPE with DeepSeek-style BOS (id 0) and EOS (id 1)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=290, special_tokens=[BOS, EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(directory / "tokenizer.json"))
    return tok


def hf_checkpoint(directory: Path, case: str, corpus: Path) -> Path:
    """A tiny random checkpoint written by transformers (config.json, safetensors, generation_config.json)."""
    import transformers

    family, kwargs = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**{**kwargs, "vocab_size": 300, "bos_token_id": 0,
                                                         "eos_token_id": 1})
    model = spread_norms_and_router_biases(getattr(transformers, f"{family}ForCausalLM")(config).eval())
    model.save_pretrained(directory)
    tokenizer_for(directory, corpus)
    return directory
