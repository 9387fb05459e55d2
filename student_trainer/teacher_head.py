"""The teacher's output layer on the student's device: HIDDEN rows -> the exact teacher distribution.

    head = await fetch_teacher_head(client, info, device)    # GetOutputLayer, checked against GetInfo
    head = TeacherHead.from_backend(backend, device)          # the in-process teacher's own layer
    lp = head.logprobs(hidden_rows, temperature, vocab_size)  # (r, V_s) teacher log-probs at T, float32

The HIDDEN signal ships H values per token instead of V (2·576 B vs 2·49k B for SmolLM2; ~30-75× less at
real vocabularies: the route verl #6194 and NeMo-RL #3978 take); the student rebuilds the teacher's logits
exactly as the server would (logits = scale · (h @ W.T + b), then Gemma's soft-cap) and the loss consumes them
block by block (dense_kd.py), so no (B, T, V) teacher tensor is ever built.

Why the layer comes over gRPC (GetOutputLayer, once per rank) and not from the teacher's model folder: see
teacher_server/output_layer.py. Before the first step it is checked against GetInfo: shape = (vocab_size,
hidden_size), dtype = output_layer.dtype, and the blake2b fingerprint of the very bytes received; any
mismatch is a TeacherCompatError naming both values. Compute runs in float32 (a bf16 teacher's weights are
upcast: the student's logits are then slightly more precise than the bf16 server's own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from asymkd.contract import OutputLayerInfo, TeacherInfo
from asymkd.remote import output_layer_fingerprint
from student_trainer.sources.common import TeacherCompatError

_NEG_INF = float("-inf")


@dataclass
class TeacherHead:
    """weight (V_t, H) and bias (V_t,) | None in float32 on the student's device, with the logit extras."""

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float = 0.0

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def build(cls, weight: Tensor, bias: Tensor | None, layer: OutputLayerInfo, device) -> TeacherHead:
        w = weight.to(device=device, dtype=torch.float32)
        b = None if bias is None else bias.to(device=device, dtype=torch.float32)
        return cls(w, b, float(layer.logit_scale or 1.0), float(layer.logit_softcap or 0.0))

    @classmethod
    def from_backend(cls, backend, device) -> TeacherHead:
        """The in-process teacher's own output layer (teacher_server/output_layer.py finds it)."""
        from teacher_server.output_layer import OutputLayerExport

        export = OutputLayerExport.of(backend)
        if export is None:
            raise TeacherCompatError(f"the in-process teacher ({type(backend).__name__}) has no output layer")
        info = OutputLayerInfo(logit_scale=export.scale, logit_softcap=export.softcap)
        return cls.build(export.weight, export.bias, info, device)

    def logits(self, hidden: Tensor) -> Tensor:
        """(r, H) -> (r, V_t) float32 teacher logits."""
        z = F.linear(hidden.to(self.weight.device, torch.float32), self.weight, self.bias)
        if self.scale != 1.0:
            z = z.mul_(self.scale)
        if self.softcap:
            z = torch.tanh(z.div_(self.softcap)).mul_(self.softcap)
        return z

    def logprobs(self, hidden: Tensor, temperature: float, vocab_size: int) -> Tensor:
        """(r, H) -> (r, V_s) log softmax(logits / T) over the student's width: a wider teacher's extra
        columns are cut and the rest renormalized, a narrower one gets -inf (the padded-vocab rule)."""
        z = self.logits(hidden)
        if z.shape[1] > vocab_size:
            z = z[:, :vocab_size]
        if temperature != 1.0:
            z = z.div_(temperature)
        lp = torch.log_softmax(z, dim=-1)
        return F.pad(lp, (0, vocab_size - lp.shape[1]), value=_NEG_INF) if lp.shape[1] < vocab_size else lp


def check_output_layer(weight: Tensor, bias: Tensor | None, info: TeacherInfo) -> OutputLayerInfo:
    """Raise TeacherCompatError unless the received layer is the one GetInfo describes."""
    layer = info.output_layer
    where = f"teacher {info.model!r}"
    if layer is None:
        raise TeacherCompatError(f"{where} serves no output layer: it cannot give the hidden signal")
    if tuple(weight.shape) != (info.vocab_size, info.hidden_size):
        raise TeacherCompatError(
            f"{where}: output layer {tuple(weight.shape)} != (vocab_size {info.vocab_size}, hidden_size "
            f"{info.hidden_size}) of GetInfo"
        )
    dtype = str(weight.dtype).removeprefix("torch.")
    if dtype != layer.dtype or (bias is not None) != layer.has_bias:
        raise TeacherCompatError(
            f"{where}: output layer dtype {dtype} (bias {bias is not None}) != GetInfo's {layer.dtype} "
            f"(bias {layer.has_bias})"
        )
    got = output_layer_fingerprint(weight, bias, layer.logit_scale, layer.logit_softcap)
    if got != layer.fingerprint:
        raise TeacherCompatError(
            f"{where}: output layer fingerprint {got} != GetInfo's {layer.fingerprint} (a different or "
            "damaged layer)"
        )
    return layer


async def fetch_teacher_head(client, info: TeacherInfo, device) -> TeacherHead:
    """GetOutputLayer from the teacher `client` talks to, checked against `info`, on `device`."""
    weight, bias = await client.output_layer()
    layer = check_output_layer(weight, bias, info)
    return TeacherHead.build(weight, bias, layer, device)
