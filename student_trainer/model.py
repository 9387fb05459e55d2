"""The student model and its tokenizer: an HF folder, or a random-init Llama built from `ModelSection` keys.

    from student_trainer.model import load_tokenizer, build_student
    tok, tok_dir = load_tokenizer(cfg.model)
    model = build_student(cfg.model, tokenizer_len=len(tok), seed=0)

Every rank builds the same full model (same seed) before FSDP shards it; for students too large for one
host's memory, build on the meta device instead (not needed at the sizes this project trains on CPU).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asymkd.config import ConfigError
from student_trainer.config import ModelSection

log = logging.getLogger("asymkd.student")


def tokenizer_dir(model: ModelSection) -> Path:
    return Path(model.tokenizer or model.path).expanduser()


def load_tokenizer(model: ModelSection) -> tuple[Any, Path]:
    """The student tokenizer (local folder only) and the folder it came from."""
    from transformers import AutoTokenizer

    path = tokenizer_dir(model)
    if not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        raise ConfigError(f"model.tokenizer / model.path: no tokenizer files in {path}")
    return AutoTokenizer.from_pretrained(path), path


def llama_config(model: ModelSection, vocab_size: int, tokenizer: Any = None) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size or 4 * model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads or model.num_heads,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=model.tie_word_embeddings,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )


def build_student(
    model: ModelSection, *, tokenizer_len: int, seed: int = 0, tokenizer: Any = None
) -> nn.Module:
    """The student as a transformers causal LM in `model.dtype`, in training mode, on the CPU.

    Random init uses `seed` (identical on every rank). The vocabulary is `model.vocab_size` or the
    tokenizer's; it must cover every id the tokenizer produces.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per step is the progress report
    dtype = getattr(torch, model.dtype)
    torch.manual_seed(seed)
    if model.path:
        student = AutoModelForCausalLM.from_pretrained(
            Path(model.path).expanduser(), dtype=dtype, attn_implementation=model.attn_implementation
        )
    else:
        vocab = model.vocab_size or tokenizer_len
        config = llama_config(model, vocab, tokenizer)
        config._attn_implementation = model.attn_implementation
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    vocab = student.get_output_embeddings().weight.shape[0]
    if vocab < tokenizer_len:
        raise ValueError(
            f"the student's vocab ({vocab}) is smaller than its tokenizer's ({tokenizer_len} ids)"
        )
    student.config.use_cache = False  # no KV cache while training
    n_params = sum(p.numel() for p in student.parameters())
    log.info(
        "student: %s, %.2fM parameters, vocab %d, %s", type(student).__name__, n_params / 1e6, vocab, dtype
    )
    return student.train()


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks (the FSDP / activation-checkpointing units)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (expected model.layers)")
