"""Token ids packed to ceil(log2 V) bits: the compact id encoding of the wire and of the offline cache.

    bits = id_bits(vocab_size)                       # 16 for V = 49,152; 18 for V = 151,936
    blob = pack_ids(ids, bits)                       # (..., k) integers in [0, 2^bits) -> bytes
    ids = unpack_ids(blob, bits, shape)              # -> int64 tensor of `shape`
    msg = pack_tensor(ids, bits); ids = unpack_tensor(msg)   # as an asymkd.v1 Tensor (dtype PACKED_UINT)

The ids are laid out one after the other, little-endian within 64-bit words, so a packed row is
ceil(k · bits / 8) bytes and any V packs with no waste beyond the last byte. Vectorized numpy: no Python loop
over ids. -1 (a padding id, e.g. SAMPLED rows) is not representable: shift by one first if you need it;
`pack_tensor` does (its Tensor message carries the shift as `offset`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from asymkd.v1 import teacher_pb2 as pb


def id_bits(vocab_size: int) -> int:
    """Bits that hold every id in [0, vocab_size)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, math.ceil(math.log2(vocab_size)))


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_ids(ids: torch.Tensor | np.ndarray, bits: int) -> bytes:
    """Integers in [0, 2^bits) (any shape) -> their low `bits` bits, concatenated (C order)."""
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in [1, 63], got {bits}")
    flat = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).reshape(-1).astype(np.uint64)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"an id ({int(flat.max())}) does not fit in {bits} bits")
    # bit j of id i goes to stream position i·bits + j: spread each id over its bits, then pack the stream.
    shifts = np.arange(bits, dtype=np.uint64)
    stream = ((flat[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little").tobytes()


def unpack_ids(blob: bytes, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The inverse of pack_ids: an int64 tensor of `shape`."""
    count = math.prod(shape)
    if len(blob) != packed_nbytes(count, bits):
        raise ValueError(
            f"{len(blob)} bytes for {count} ids of {bits} bits (expected {packed_nbytes(count, bits)})"
        )
    stream = np.unpackbits(np.frombuffer(blob, dtype=np.uint8), bitorder="little", count=count * bits)
    weights = np.left_shift(np.uint64(1), np.arange(bits, dtype=np.uint64))
    values = (stream.reshape(count, bits).astype(np.uint64) * weights).sum(axis=1)
    return torch.from_numpy(values.astype(np.int64)).reshape(tuple(shape))


def pack_tensor(x: torch.Tensor, bits: int = 0) -> pb.Tensor:
    """Integers as a PACKED_UINT Tensor: `bits` per value (0 = what the values need), shifted so the smallest
    value (if negative) stores as 0."""
    x = x.detach().to("cpu", torch.int64)
    lo = min(int(x.min()), 0) if x.numel() else 0
    hi = int(x.max()) if x.numel() else 0
    bits = max(bits, id_bits(hi - lo + 1))
    blob = pack_ids(x - lo if lo else x, bits)
    return pb.Tensor(dtype=pb.PACKED_UINT, shape=list(x.shape), data=blob, bits=bits, offset=lo)


def unpack_tensor(t: pb.Tensor) -> torch.Tensor:
    """A PACKED_UINT Tensor message -> int64 tensor; ValueError on bad bits or a wrong byte count."""
    if not 1 <= t.bits <= 63:
        raise ValueError(f"bits {t.bits} not in [1, 63] for PACKED_UINT")
    out = unpack_ids(t.data, t.bits, tuple(t.shape))
    return out + t.offset if t.offset else out
