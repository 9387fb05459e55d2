"""Text for Generate: prompts given as text are tokenized here, samples decoded back when asked (return_text).

    codec = TextCodec(tokenizer)             # a transformers tokenizer (the backend loads it with the model)
    ids = codec.encode("Once upon a time")   # list[int], the tokenizer's special tokens added, no chat template
    det = codec.detokenizer()                # one per (prompt, sample)
    piece = det.add([17, 42])                # the text new since the previous call ("" while incomplete)
    rest = det.finish()                      # whatever was held back

Decoding is incremental the simple way: the sample's whole id list is decoded each time and the new suffix
returned, holding back text that ends in U+FFFD (a UTF-8 character split over tokens) until more comes.
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
        self.sent = 0  # characters of the decoded text handed out so far

    def add(self, ids: list[int]) -> str:
        if not ids:
            return ""
        self.ids.extend(ids)
        text = self.codec.decode(self.ids)
        if text.endswith(_REPLACEMENT):  # a character split over tokens: wait for the rest
            return ""
        return self._take(text)

    def finish(self) -> str:
        return self._take(self.codec.decode(self.ids)) if self.ids else ""

    def _take(self, text: str) -> str:
        piece, self.sent = text[self.sent :], len(text)
        return piece
