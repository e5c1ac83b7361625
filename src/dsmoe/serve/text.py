"""From generated token ids to the text a client may see: incremental detokenisation and stop strings.

Two things other servers get wrong and this module exists for:
- byte-level BPE splits a multi-byte UTF-8 character over several tokens; decoding a prefix that ends inside
  one gives U+FFFD. Text is only released once it no longer ends in an incomplete character, so a stream
  never shows a replacement character that the full decode does not have, and never drops one.
- a stop string may complete across tokens ("\\n\\n" from "\\n" + "\\n"). Text that could still be the start of
  a stop string is held back; when one completes, the text is cut before it and nothing after is released.

The released pieces concatenate to exactly the text a non-streaming answer returns (both are built here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, newly complete text out.

    Each `add` decodes the whole sequence so far (skipping special tokens) and releases what follows the
    text already released, unless the decode ends in U+FFFD (a character still incomplete) or no longer
    extends it (a decoder that rewrites earlier text; it is released once it does, or by `flush`).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.released = ""

    def add(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith(_REPLACEMENT) or not text.startswith(self.released):
            return ""
        new = text[len(self.released):]
        self.released = text
        return new

    def flush(self) -> str:
        """Everything not yet released, at the end of generation (an incomplete final character stays U+FFFD,
        as in the full decode)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = text[len(self.released):] if text.startswith(self.released) else ""
        self.released += new
        return new


class TextStream:
    """Generated ids -> client text, with stop strings.

    push(ids) returns the text safe to send now; `stopped` turns true when a stop string completed (the
    caller then ends the request: finish_reason "stop"). `finish()` returns the rest at the end.
    eos_token_ids: an EOS id that ends generation is counted as a token but never decoded into text.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), eos_token_ids: Iterable[int] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        self._eos = frozenset(eos_token_ids)
        self._pending = ""  # decoded, not yet sent: might be the start of a stop string
        self.stopped = False
        self.text = ""  # everything sent so far

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        """Feed the ids of one engine event; final: the request ended with this event."""
        if self.stopped:
            return ""
        ids = list(ids)
        if final and ids and ids[-1] in self._eos:
            ids = ids[:-1]  # the EOS that ended generation is not text, special token or not
        new = self._detok.add(ids)
        if final:
            new += self._detok.flush()
        return self._release(self._pending + new, final)

    def _release(self, buffer: str, final: bool) -> str:
        cut = min((i for i in (buffer.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return self._send(buffer[:cut])
        hold = 0 if final else self._held(buffer)
        self._pending = buffer[len(buffer) - hold:]
        return self._send(buffer[:len(buffer) - hold])

    def _held(self, buffer: str) -> int:
        """The longest end of `buffer` that is a proper start of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buffer)), best, -1):
                if buffer.endswith(s[:k]):
                    best = k
                    break
        return best

    def _send(self, text: str) -> str:
        self.text += text
        return text

    def finish(self) -> str:
        """The text still held back when generation ended without a final event carrying tokens."""
        return self.push([], final=True)
