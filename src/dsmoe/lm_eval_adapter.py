"""lm-evaluation-harness model adapter: `--model dsmoe --model_args pretrained=DIR[,dtype=bf16,max_length=N]`.

Importing this module registers the model under the name "dsmoe" (lm_eval's `register_model`). lm_eval 0.4
finds models only by import (it has no plugin entry point for models), so run the harness through

    python -m dsmoe.lm_eval_adapter --model dsmoe --model_args pretrained=runs/tiny-v3 --tasks hellaswag

which registers the adapter and then runs lm_eval's own command line, or in Python
`import dsmoe.lm_eval_adapter` before `lm_eval.simple_evaluate(model="dsmoe", ...)`.

The three request types, on the checkpoint's own tokenizer:

- loglikelihood(context, continuation): sum of log p over the continuation's tokens and whether each was
  the greedy choice; the continuation's tokens are those of encode(context + continuation) past
  encode(context) (as transformers' adapter splits them), the context cut from the left to fit max_length.
- loglikelihood_rolling(text): log p of the whole text in windows of max_length (dsmoe.train.text_eval),
  the first token conditioned on the end-of-text token.
- generate_until(context, {"until": [...], "max_gen_toks": N}): greedy decoding (dsmoe.generate), cut
  at the first stop string.

Needs the `eval` extra (`pip install dsmoe[eval]`, i.e. lm_eval); dsmoe itself does not import this module.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .checkpoint import load_pretrained
from .generate import generate
from .train.prepare import checkpoint_token_ids
from .train.text_eval import windows
from .train.tokenizer import load_tokenizer

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


@register_model("dsmoe")
class DsmoeLM(LM):
    """A dsmoe checkpoint directory (config.json, safetensors, tokenizer.json) as an lm_eval model."""

    def __init__(self, pretrained: str, dtype: str = "fp32", max_length: int | None = None,
                 max_gen_toks: int = 256, **_ignored: Any) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(_DTYPES)}")
        directory = Path(pretrained)
        self.tokenizer = load_tokenizer(directory)
        self.model = load_pretrained(directory, dtype=_DTYPES[dtype]).eval()
        self.eot_token_id, self.bos_token_id, _ = checkpoint_token_ids(directory, self.model.config, self.tokenizer)
        self.max_length = int(max_length or min(self.model.config.max_position_embeddings, 2048))
        self.max_gen_toks = int(max_gen_toks)
        self._name = str(directory)

    @property
    def tokenizer_name(self) -> str:
        return self._name

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _prefix(self) -> int:
        return self.bos_token_id if self.bos_token_id is not None else self.eot_token_id

    @torch.no_grad()
    def _continuation_logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1):]  # the last token is only a target
        inputs = torch.tensor([ids[:-1]])
        log_p = F.log_softmax(self.model(inputs)[0].float(), dim=-1)  # (L, V)
        rows = log_p[-len(continuation):]
        target = torch.tensor(continuation)
        total = float(rows.gather(1, target[:, None]).sum())
        return total, bool((rows.argmax(-1) == target).all())

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            whole = self.tok_encode(context + continuation)
            context_ids = self.tok_encode(context)
            cont_ids = whole[len(context_ids):] if whole[:len(context_ids)] == context_ids \
                else self.tok_encode(continuation)
            if not context_ids:
                context_ids = [self._prefix()]
            if not cont_ids:
                out.append((0.0, True))
                continue
            out.append(self._continuation_logprob(context_ids, cont_ids))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            ids = torch.tensor([self._prefix(), *self.tok_encode(text)])
            total = 0.0
            if ids.numel() > 1:
                for begin, end, first in windows(ids.numel(), self.max_length, self.max_length - 1):
                    log_p = F.log_softmax(self.model(ids[None, begin:end])[0].float(), dim=-1)
                    rows = torch.arange(first - 1 - begin, end - 1 - begin)
                    total += float(log_p[rows, ids[begin + rows + 1]].sum())
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self.tok_encode(context) or [self._prefix()])[-(self.max_length - max_new):]
            tokens = generate(self.model, torch.tensor([ids]), max_new, eos_token_id=self.eot_token_id)
            text = self.tokenizer.decode(tokens[0, len(ids):].tolist(), skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the dsmoe model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
