"""Model shapes and GPU node datasheets the planner knows without any download, and how a model is named.

    shape = resolve_model("llama3-70b")                       # a built-in preset (numbers below)
    shape = resolve_model("/models/my-teacher")               # an HF folder: its config.json
    shape = resolve_model("layers=32,hidden=4096,intermediate=14336,heads=32,kv_heads=8,vocab=128256")
    gpu = GPU_PRESETS["h100"]

Every preset is copied from the model's public `config.json` (the Hugging Face repository named beside it);
only the fields the cost model needs are kept. GPU numbers are the vendors' datasheet figures (dense BF16,
no sparsity), per GPU, one direction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Llama/Qwen family: GQA attention, gated SwiGLU MLP, RMSNorm)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0
    """0 = hidden / heads"""
    tied: bool = False
    """input embedding shared with the output layer"""

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.head_dim == 0 and self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}; give head_dim")

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def attn_dim(self) -> int:
        """Width of the query/output projections (heads × head_dim; not always = hidden, e.g. Qwen3-32B)."""
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def layer_params(self) -> int:
        """Parameters of one decoder block: q, k, v, o projections + gate/up/down + two norms."""
        h = self.hidden
        return h * self.attn_dim * 2 + h * self.kv_dim * 2 + 3 * h * self.intermediate + 2 * h

    def embed_params(self) -> int:
        """Input embedding + output layer (one matrix when tied) + the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embed_params()

    def forward_flops_per_token(self, seq_len: int, *, output_layer: bool = True) -> float:
        """FLOPs of one token's forward pass in a causal sequence of `seq_len` tokens: 2 per weight of the
        blocks, attention scores + weighted values (2 × 2 × attn_dim × the mean context seq_len/2 per
        layer), and the output layer (2 × vocab × hidden) when `output_layer`."""
        matmul = 2.0 * self.layers * (self.layer_params() - 2 * self.hidden)
        attention = 2.0 * self.layers * self.attn_dim * seq_len
        head = 2.0 * self.vocab * self.hidden if output_layer else 0.0
        return matmul + attention + head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache of one token over all layers."""
        return 2 * self.layers * self.kv_dim * dtype_bytes


# Numbers from each model's public config.json on the Hugging Face Hub (repository in the comment).
MODEL_PRESETS: dict[str, ModelShape] = {
    # meta-llama/Meta-Llama-3-70B: hidden_size 8192, intermediate_size 28672, num_hidden_layers 80,
    # num_attention_heads 64, num_key_value_heads 8, vocab_size 128256, tie_word_embeddings false
    "llama3-70b": ModelShape("llama3-70b", 80, 8192, 28672, 64, 8, 128256),
    # meta-llama/Meta-Llama-3-8B: hidden_size 4096, intermediate_size 14336, num_hidden_layers 32,
    # num_attention_heads 32, num_key_value_heads 8, vocab_size 128256, tie_word_embeddings false
    "llama3-8b": ModelShape("llama3-8b", 32, 4096, 14336, 32, 8, 128256),
    # meta-llama/Llama-3.2-1B: hidden_size 2048, intermediate_size 8192, num_hidden_layers 16,
    # num_attention_heads 32, num_key_value_heads 8, head_dim 64, vocab_size 128256, tie_word_embeddings true
    "llama3.2-1b": ModelShape("llama3.2-1b", 16, 2048, 8192, 32, 8, 128256, 64, tied=True),
    # meta-llama/Llama-3.1-405B: hidden_size 16384, intermediate_size 53248, num_hidden_layers 126,
    # num_attention_heads 128, num_key_value_heads 8, vocab_size 128256, tie_word_embeddings false
    "llama3.1-405b": ModelShape("llama3.1-405b", 126, 16384, 53248, 128, 8, 128256),
    # Qwen/Qwen3-32B: hidden_size 5120, intermediate_size 25600, num_hidden_layers 64,
    # num_attention_heads 64, num_key_value_heads 8, head_dim 128, vocab_size 151936, tie_word_embeddings false
    "qwen3-32b": ModelShape("qwen3-32b", 64, 5120, 25600, 64, 8, 151936, 128),
    # Qwen/Qwen3-8B: hidden_size 4096, intermediate_size 12288, num_hidden_layers 36,
    # num_attention_heads 32, num_key_value_heads 8, head_dim 128, vocab_size 151936, tie_word_embeddings false
    "qwen3-8b": ModelShape("qwen3-8b", 36, 4096, 12288, 32, 8, 151936, 128),
    # Qwen/Qwen3-1.7B: hidden_size 2048, intermediate_size 6144, num_hidden_layers 28,
    # num_attention_heads 16, num_key_value_heads 8, head_dim 128, vocab_size 151936, tie_word_embeddings true
    "qwen3-1.7b": ModelShape("qwen3-1.7b", 28, 2048, 6144, 16, 8, 151936, 128, tied=True),
    # Qwen/Qwen3-0.6B: hidden_size 1024, intermediate_size 3072, num_hidden_layers 28,
    # num_attention_heads 16, num_key_value_heads 8, head_dim 128, vocab_size 151936, tie_word_embeddings true
    "qwen3-0.6b": ModelShape("qwen3-0.6b", 28, 1024, 3072, 16, 8, 151936, 128, tied=True),
}


@dataclass(frozen=True)
class GpuSpec:
    """One GPU of a node: memory, dense BF16 peak, HBM, NVLink and NIC bandwidth (one direction), latency."""

    name: str
    mem_gb: float
    peak_tflops: float
    hbm_gbps: float
    intra_gbps: float
    inter_gbps: float
    intra_latency_us: float
    inter_latency_us: float
    gpus_per_node: int = 8
    overlap_comm: bool = True
    """communication overlaps compute (GPUs: yes; a CPU core calibrated as a device: no)"""


# Datasheets: NVIDIA H100 SXM5 (80 GB HBM3, 989 TFLOP/s dense BF16, 3.35 TB/s, NVLink 4 900 GB/s both ways),
# H200 SXM (141 GB HBM3e, 4.8 TB/s, same compute and NVLink), A100 SXM4 80GB (312 TFLOP/s, 2.04 TB/s, NVLink 3
# 600 GB/s both ways); one 400 Gb/s NIC per GPU (NDR InfiniBand, 50 GB/s) on H100/H200 nodes, 200 Gb/s (HDR)
# on A100 nodes. Latencies are typical NCCL small-message step latencies (NVLink / InfiniBand).
GPU_PRESETS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", 80, 989, 3350, 450, 50, 5, 12),
    "h200": GpuSpec("h200", 141, 989, 4800, 450, 50, 5, 12),
    "a100": GpuSpec("a100", 80, 312, 2039, 300, 25, 6, 15),
}

_SIZE_KEYS = {f.name for f in fields(ModelShape)} - {"name"}
_HF_KEYS = {  # our key -> config.json key
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "vocab": "vocab_size",
    "head_dim": "head_dim",
    "tied": "tie_word_embeddings",
}


def resolve_model(spec: str) -> ModelShape:
    """A preset name, an HF folder (or its config.json), or `layers=..,hidden=..,...`; ValueError says which
    forms are accepted."""
    spec = spec.strip()
    if spec in MODEL_PRESETS:
        return MODEL_PRESETS[spec]
    if "=" in spec:
        return _from_sizes(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        return _from_hf_config(path)
    raise ValueError(
        f"{spec!r} is not a preset ({', '.join(MODEL_PRESETS)}), an HF folder with config.json, "
        "or sizes like layers=32,hidden=4096,intermediate=14336,heads=32,kv_heads=8,vocab=128256"
    )


def _from_sizes(spec: str) -> ModelShape:
    values: dict[str, int | bool] = {}
    for item in spec.split(","):
        key, _, value = item.strip().partition("=")
        key = key.strip().replace("-", "_")
        if key not in _SIZE_KEYS:
            raise ValueError(f"unknown size {key!r} in {spec!r} (sizes: {', '.join(sorted(_SIZE_KEYS))})")
        try:
            values[key] = value.strip().lower() in ("1", "true") if key == "tied" else int(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not an integer") from None
    missing = sorted({"layers", "hidden", "intermediate", "heads", "vocab"} - set(values))
    if missing:
        raise ValueError(f"sizes {spec!r} lack {', '.join(missing)}")
    values.setdefault("kv_heads", values["heads"])
    return ModelShape(name="custom", **values)  # type: ignore[arg-type]


def _from_hf_config(path: Path) -> ModelShape:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model
    values = {ours: cfg[theirs] for ours, theirs in _HF_KEYS.items() if cfg.get(theirs) is not None}
    missing = sorted({"layers", "hidden", "intermediate", "heads", "vocab"} - set(values))
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(_HF_KEYS[m] for m in missing)}")
    values.setdefault("kv_heads", values["heads"])
    return ModelShape(name=path.parent.name, **values)


def with_overrides(gpu: GpuSpec, **overrides: float | int | None) -> GpuSpec:
    """The GPU preset with the values given (None = keep the datasheet's)."""
    return replace(gpu, **{k: v for k, v in overrides.items() if v is not None})
