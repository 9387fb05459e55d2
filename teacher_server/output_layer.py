"""The teacher's output layer as GetOutputLayer serves it: the HIDDEN signal's other half.

    export = OutputLayerExport.of(backend)        # None when the backend has no output layer in torch
    info = export.info()                          # OutputLayerInfo: dtype, extras, fingerprint (computed once)
    for chunk in export.chunks(chunk_bytes): ...  # OutputLayerChunk messages, rows of W in order

Why an RPC rather than the student reading the teacher's model folder (teacher_server/backends/vllm_head.py
knows how): the student may not see the teacher's files at all (another partition, a Kubernetes volume
mounted on the teacher pods only), the teacher may have loaded a GGUF or converted the dtype, and the
weights the server holds are by construction the ones that produced the hidden states. It is sent once per
student rank (100 MB for the 49k × 512 bench teacher in fp32; ~1.2 GB for 150k × 4k in bf16, a few seconds
on a LAN) and checked against GetInfo's fingerprint, so a truncated or mixed-up layer fails at start.

Both backends keep their output layer as `_head` (hf: the model's nn.Linear + `_extras`; vLLM's pooling
runner: vllm_head.OutputHead, which carries its extras); a backend without one (vLLM's generate runner)
offers no HIDDEN signal and no output layer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from asymkd.contract import OutputLayerInfo
from asymkd.remote import output_layer_fingerprint
from asymkd.v1 import teacher_pb2 as pb
from asymkd.wire import tensor_to_proto


class OutputLayerExport:
    """An output layer (weight (V, H), optional bias (V,), logit scale and soft-cap) ready to be served."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float) -> None:
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.scale, self.softcap = float(scale), float(softcap or 0.0)
        self._info: OutputLayerInfo | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, backend) -> OutputLayerExport | None:
        head = getattr(backend, "_head", None)
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return None
        extras = getattr(head, "extras", None) or getattr(backend, "_extras", None)
        scale = getattr(extras, "scale", 1.0)
        softcap = getattr(extras, "softcap", None) or 0.0
        return cls(weight, getattr(head, "bias", None), scale, softcap)

    def info(self) -> OutputLayerInfo:
        """The layer's facts; the fingerprint hashes every byte (blocking: call it off the event loop)."""
        with self._lock:
            if self._info is None:
                self._info = OutputLayerInfo(
                    fingerprint=output_layer_fingerprint(self.weight, self.bias, self.scale, self.softcap),
                    dtype=str(self.weight.dtype).removeprefix("torch."),
                    logit_scale=self.scale,
                    logit_softcap=self.softcap,
                    has_bias=self.bias is not None,
                )
            return self._info

    def chunks(self, chunk_bytes: int) -> Iterator[pb.OutputLayerChunk]:
        """Rows of W, about `chunk_bytes` per message (at least one row); the bias with the first."""
        vocab, hidden = self.weight.shape
        step = max(1, chunk_bytes // max(hidden * self.weight.element_size(), 1))
        for a in range(0, vocab, step):
            msg = pb.OutputLayerChunk(first_row=a, weight=tensor_to_proto(self.weight[a : a + step]))
            if a == 0 and self.bias is not None:
                msg.bias.CopyFrom(tensor_to_proto(self.bias))
            yield msg
