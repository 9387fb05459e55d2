"""Wire codec: `asymkd.v1.Tensor` <-> torch tensors (little-endian, C order; never pickle, never JSON).

t = to_proto(torch.randn(3, 4))          # -> teacher_pb2.Tensor
x = from_proto(t)                        # -> torch.Tensor, same dtype/shape/values
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from asymkd.v1 import teacher_pb2 as pb

TORCH_OF_DTYPE: dict[int, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.INT32: torch.int32,
    pb.INT64: torch.int64,
    pb.UINT8: torch.uint8,
}
DTYPE_OF_TORCH: dict[torch.dtype, int] = {v: k for k, v in TORCH_OF_DTYPE.items()}
# Value dtypes a caller may ask for in ScoreRequest.value_dtype / GenerateRequest.value_dtype.
VALUE_DTYPES = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)
_LITTLE = sys.byteorder == "little"


class WireError(ValueError):
    """A Tensor message that cannot be decoded; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def to_proto(x: torch.Tensor) -> pb.Tensor:
    """Encode a CPU/GPU tensor as a Tensor message (copies to host memory, C order)."""
    if x.dtype not in DTYPE_OF_TORCH:
        raise TypeError(f"dtype {x.dtype} has no wire encoding; use one of {list(DTYPE_OF_TORCH)}")
    x = x.detach().to("cpu").contiguous()
    # numpy has no bfloat16: ship its raw 16-bit pattern.
    raw = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    arr = raw.numpy()
    if not _LITTLE:
        arr = arr.byteswap()
    return pb.Tensor(dtype=DTYPE_OF_TORCH[x.dtype], shape=list(x.shape), data=arr.tobytes())


def from_proto(t: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decode a Tensor message; raises WireError (naming `field`) on unknown dtype or size mismatch."""
    if t.dtype not in TORCH_OF_DTYPE:
        raise WireError(f"{field}.dtype", f"unknown or unspecified dtype {t.dtype}")
    if any(d < 0 for d in t.shape):
        raise WireError(f"{field}.shape", f"negative dimension in {list(t.shape)}")
    dtype = TORCH_OF_DTYPE[t.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(t.shape)
    if len(t.data) != numel * itemsize:
        raise WireError(
            f"{field}.data",
            f"{len(t.data)} bytes for shape {list(t.shape)} of {dtype} (expected {numel * itemsize})",
        )
    if numel == 0:
        return torch.empty(tuple(t.shape), dtype=dtype)
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
    arr = np.frombuffer(t.data, dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(tuple(t.shape))
    out = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    return out.view(torch.bfloat16) if dtype == torch.bfloat16 else out
