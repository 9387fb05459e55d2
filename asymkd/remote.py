"""What travels beside the Score messages, both ends: data-plane tensor references and the output layer's
fingerprint.

    ref = RemoteRef.from_proto(msg)                       # ScoreResponse.remote -> (field, dtype, shape, tag)
    fill_remote(results, ref, tensor, expected_rows(req))  # the fetched tensor -> each sequence's rows (views)
    output_layer_fingerprint(weight, bias, scale, softcap) # what GetInfo.output_layer.fingerprint says

The server makes RemoteRefs when a request names a data-plane session (teacher_server/data_plane.py); the
client fetches each over the pair group (student_trainer/sources/data_plane.py) and fills the results.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from asymkd.contract import SequenceScores
from asymkd.v1 import teacher_pb2 as pb
from asymkd.wire import _LITTLE, DTYPE_OF_TORCH, TORCH_OF_DTYPE, DataLossError


@dataclass(frozen=True)
class RemoteRef:
    """A tensor of a request that travels over the data plane (the proto's RemoteTensor)."""

    field: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    tag: int

    def to_proto(self) -> pb.RemoteTensor:
        return pb.RemoteTensor(
            field=self.field, dtype=DTYPE_OF_TORCH[self.dtype], shape=self.shape, tag=self.tag
        )

    @classmethod
    def from_proto(cls, msg: pb.RemoteTensor) -> RemoteRef:
        if msg.field not in ("full", "hidden") or msg.dtype not in TORCH_OF_DTYPE or len(msg.shape) != 2:
            raise DataLossError(
                f"remote tensor {msg.field!r} {msg.dtype} {list(msg.shape)} is not a [rows, width] row field"
            )
        return cls(msg.field, TORCH_OF_DTYPE[msg.dtype], tuple(msg.shape), msg.tag)


def fill_remote(results: list[SequenceScores], ref: RemoteRef, tensor: torch.Tensor, rows: list[int]) -> None:
    """Put the rows of a fetched data-plane tensor into each sequence's result (views, no copy)."""
    if tensor.shape[0] != sum(rows):
        raise DataLossError(f"remote {ref.field}: {tensor.shape[0]} rows for {sum(rows)} requested")
    for s, part in zip(results, tensor.split(rows), strict=True):
        setattr(s, ref.field, part)


def output_layer_fingerprint(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float
) -> str:
    """blake2b-128 of an output layer's bytes as they travel (little-endian, C order) and its extras: what
    TeacherInfo.output_layer.fingerprint says and what the student checks after GetOutputLayer."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{list(weight.shape)}|{weight.dtype}|{scale!r}|{softcap!r}|".encode())
    for t in (weight, bias):
        if t is None:
            continue
        x = t.detach().to("cpu").contiguous()
        arr = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()
        h.update(memoryview(arr if _LITTLE else arr.byteswap()).cast("B"))
    return h.hexdigest()
