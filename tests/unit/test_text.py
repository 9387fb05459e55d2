"""Generate's text codec (teacher_server/text.py) on the tiny byte-level BPE: incremental decoding hands out
exactly the whole decoded text, never half a UTF-8 character."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from teacher_server.text import TextCodec


@pytest.fixture(scope="module")
def codec(tiny_teacher_dir):
    return TextCodec(AutoTokenizer.from_pretrained(tiny_teacher_dir))


def test_incremental_text_is_the_whole_text_without_broken_characters(codec):
    text = "def café(x):\n    return '日本' + x  # ünïcode"
    ids = codec.encode(text)
    det = codec.detokenizer()
    pieces = [det.add([t]) for t in ids]
    pieces.append(det.finish())
    assert "".join(pieces) == codec.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") >= 1  # some character took more than one token: held back until complete


def test_special_tokens_are_not_text(codec):
    eos = codec.tokenizer.eos_token_id
    det = codec.detokenizer()
    assert det.add(codec.encode("x = 1")) + det.add([eos]) + det.finish() == "x = 1"
