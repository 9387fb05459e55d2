"""Text for Generate: prompts given as text are tokenized here, samples decoded back when asked (return_text).

    codec = TextCodec(tokenizer)             # a transformers tokenizer (the backend loads it with the model)
    ids = codec.encode("Once upon a time")   # list[int], the tokenizer's special tokens added, no chat template
    det = codec.detokenizer()                # one per (prompt, sample)
    piece = det.add([17, 42])                # the text new since the previous call ("" while incomplete)
    rest = det.finish()                      # whatever was held back

Decoding is incremental with two offsets (as TGI and vLLM do): each call decodes only the ids from the last
handed-out piece's start (`prefix`) on, and returns what they add beyond the ids already handed out
(`read`), so the work per token stays bounded however long the sample grows (decoding a window rather than
single ids keeps merges such as a leading space right); text ending in U+FFFD (a UTF-8 character split over
tokens) is held back until more comes.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class TextCodec:
    """A tokenizer's encode / decode as Generate uses them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self)


class Detokenizer:
    """The decoded text of one growing sample, handed out as increments."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were handed out last; ids[:read] are handed out

    def add(self, ids: list[int]) -> str:
        if not ids:
            return ""
        self.ids.extend(ids)
        return self._take(final=False)

    def finish(self) -> str:
        return self._take(final=True) if self.ids else ""

    def _take(self, *, final: bool) -> str:
        done = self.codec.decode(self.ids[self.prefix : self.read])
        text = self.codec.decode(self.ids[self.prefix :])
        if len(text) <= len(done) or (text.endswith(_REPLACEMENT) and not final):
            return ""  # nothing new yet, or a character split over tokens: wait for the rest
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]
