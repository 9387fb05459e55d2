"""The teacher's output layer in torch, for vLLM's pooling runner (final hidden states -> exact signals).

vLLM's pooling runner (`token_embed`, pooling ALL, no activation) returns every position's final
(post-norm) hidden state; this module loads the output layer from the model folder's safetensors and turns
those rows into logits, then every Score signal goes through scoring.scores_from_logits exactly as in the
hf backend (temperature, top-k with the exact tail, FULL, AT_IDS, SAMPLED). The HIDDEN signal is the
hidden rows themselves.

Which tensor is the output layer is asked of transformers (the model built on the meta device, its
`get_output_embeddings()`, tied input embeddings included), then looked up in the checkpoint. The output
layer extras (Cohere `logit_scale`, Granite `logits_scaling`, Gemma `final_logit_softcapping`) are applied
by common.LogitExtras, as in the hf backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from asymkd.contract import SequenceScores
from teacher_server import scoring
from teacher_server.backends.base import ScoreItem, ScoreParams
from teacher_server.backends.common import LogitExtras

log = logging.getLogger("asymkd.teacher.vllm")


class OutputHead:
    """logits = hidden @ W.T (+ b), with the model's logit scaling / soft-capping. W is (V, H)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, text_config):
        self.weight = weight
        self.bias = bias
        self.extras = LogitExtras.from_config(text_config)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype, device: torch.device) -> OutputHead:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        names_w, names_b = _head_parameter_names(config)
        weight = _load_tensor(folder, names_w)
        if not weight.is_floating_point():
            raise ValueError(
                f"model: the output layer {names_w[0]} is stored as {weight.dtype} (quantized); the pooling "
                "runner needs a floating-point output layer; use --vllm.runner generate"
            )
        bias = _load_tensor(folder, names_b) if names_b else None
        log.info("output layer %s %s on %s (%s)", names_w[0], tuple(weight.shape), device, dtype)
        bias = bias.to(device=device, dtype=dtype) if bias is not None else None
        return cls(weight.to(device=device, dtype=dtype), bias, config.get_text_config())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden rows -> (N, V) logits."""
        h = hidden.to(device=self.weight.device, dtype=self.weight.dtype)
        return self.extras.apply(torch.nn.functional.linear(h, self.weight, self.bias))

    def item_scores(
        self, hidden: torch.Tensor, item: ScoreItem, params: ScoreParams, gen: torch.Generator | None
    ) -> SequenceScores:
        """Signal for one item from its (L, H) hidden states, all positions (scoring.scores_from_hidden)."""
        rows = hidden[item.score_from : item.token_ids.numel() - 1]  # (R, H): row t predicts token t+1
        return scoring.scores_from_hidden(rows, item, params, self.logits, gen)


def _head_parameter_names(config) -> tuple[list[str], list[str]]:
    """Checkpoint names that may hold the output layer's weight (and bias), most specific first."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    params = list(model.named_parameters(remove_duplicate=False))
    names_w = [n for n, p in params if p is head.weight]  # lm_head.weight, then the tied embedding if tied
    names_b = [n for n, p in params if getattr(head, "bias", None) is not None and p is head.bias]
    names_w.sort(key=lambda n: 0 if n.startswith("lm_head") else 1)
    return names_w, names_b


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded folders use their index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _load_tensor(folder: Path, candidates: list[str]) -> torch.Tensor:
    """The first candidate found in the checkpoint (exact name, else one that ends with it)."""
    from safetensors import safe_open

    files = _safetensors_files(folder)
    if not files:
        raise FileNotFoundError(
            f"model: no *.safetensors in {folder}; the pooling runner reads the output layer"
        )
    for want in candidates:
        hits = [want] if want in files else [n for n in files if n.endswith("." + want)]
        if hits:
            with safe_open(str(files[hits[0]]), framework="pt") as f:
                return f.get_tensor(hits[0])
    raise ValueError(
        f"model: the output layer ({' or '.join(candidates)}) is not in the safetensors of {folder}"
    )
