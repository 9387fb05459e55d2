"""Tiny random models for tests and benchmarks (not part of the library): a BPE tokenizer trained on Python's
own sources, and a random-init Llama with it. Nothing is downloaded.

    from tests.tiny_models import build_tiny_llama
    build_tiny_llama(tmp_path / "teacher", hidden_size=64, num_layers=2, seed=0)
"""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from pathlib import Path

import torch


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a small byte-level BPE on Python's own sources (always present) and save it as an HF tokenizer."""
    import inspect

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [inspect.getsource(m) for m in (json, textwrap, argparse, logging)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_llama(
    out_dir: str | Path,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tokenizer_from: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
) -> Path:
    """A random-init Llama saved as an HF folder, with a tokenizer (copied from `tokenizer_from`, else a tiny
    BPE). head_dim = hidden/heads should be >= 32 (vLLM's CPU attention rejects 16)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    else:
        build_tiny_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    return out
