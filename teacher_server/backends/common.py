"""Model facts every backend reads the same way: dtypes, tokenizer, EOS ids, output-layer extras.

    dtype = TORCH_DTYPES[cfg.dtype]
    tok = load_tokenizer(folder, gguf=None)          # None without tokenizer files
    tok_len, tok_hash = tokenizer_facts(folder, gguf=None, tok=tok)
    eos = eos_token_ids([generation_config, text_config])
    logits = LogitExtras.from_config(text_config).apply(hidden @ W.T)

The hf backend reads them from its loaded model, the vLLM backend from the model folder; both must report
the same GetInfo and compute the same logits for one model, so the rules live here once.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from asymkd.contract import tokenizer_hash

log = logging.getLogger("asymkd.teacher.backends")

# ServeConfig.dtype -> the torch dtype the teacher's weights run in.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(folder: Path, gguf: str | None = None):
    """The transformers tokenizer of a model folder (or a GGUF file in it); None without one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:  # a model folder without tokenizer files is legal (scoring ids only)
        log.info("no tokenizer in %s (%s): tokenizer_hash is empty", folder, type(e).__name__)
        return None


def tokenizer_facts(folder: Path, gguf: str | None = None, tok=None) -> tuple[int, str]:
    """(len(tokenizer), tokenizer_hash) of a model folder (or a GGUF file in it); (0, "") without one.
    `tok`: the folder's tokenizer when already loaded (load_tokenizer)."""
    tok = tok if tok is not None else load_tokenizer(folder, gguf)
    if tok is None:
        return 0, ""
    if not gguf:
        return len(tok), tokenizer_hash(folder)
    with tempfile.TemporaryDirectory() as tmp:  # hash the tokenizer as a converted folder would store it
        tok.save_pretrained(tmp)
        return len(tok), tokenizer_hash(tmp)


def eos_token_ids(sources: Iterable[object]) -> tuple[int, ...]:
    """The `eos_token_id`s of config objects (an int or a list each; None / missing skipped), in order,
    de-duplicated. Pass the generation config first: it is what generation stops on."""
    found: list[int] = []
    for src in sources:
        eos = getattr(src, "eos_token_id", None)
        for e in [eos] if isinstance(eos, int) else eos or []:
            if int(e) not in found:
                found.append(int(e))
    return tuple(found)


@dataclass(frozen=True)
class LogitExtras:
    """What some models apply after the output layer: Cohere multiplies the logits by `logit_scale`,
    Granite divides them by `logits_scaling`, Gemma 2/3 soft-caps them (`final_logit_softcapping`)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, text_config) -> LogitExtras:
        scale = getattr(text_config, "logit_scale", None) or 1.0
        scale /= getattr(text_config, "logits_scaling", None) or 1.0
        return cls(scale=scale, softcap=getattr(text_config, "final_logit_softcapping", None) or None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) output-layer logits -> (N, V) the model's logits."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
