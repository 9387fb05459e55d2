"""Encodings of the offline teacher cache (format 2): one shard's teacher answers <-> flat numpy arrays.

    arrays = encode(answers, parse_encoding("delta-q4"), id_bits=16, rank_of=rank_of)   # -> {name: ndarray}
    rows = decode(fetch, parse_encoding("delta-q4"), ...)                               # see decode()

An encoding is `IDS-VALUES`. Only scored positions are stored (a packed row's positions score_from..T-2; the
rows before are the prompt, rebuilt as placeholders on read).

| part | choice | per position (top-64, V = 49,152) | exact |
|---|---|---|---|
| ids | `packed` | k ids in ceil(log2 V) bits each (asymkd/packing.py), the teacher's order | yes |
| ids | `delta` | the k ids sorted by `rank_of` (the vocabulary ordered by frequency in the training tokens), stored as gaps in an exp-Golomb code whose order is fitted per list position and shard; ~60 B instead of 128 | yes (as a set) |
| values | `fp32` | k float32 | yes |
| values | `bf16` / `fp16` | k × 2 B | no: |Δ lp_i| ≤ 2^-9 (2^-11 fp16) · (|lp_i| + max_j |lp_j|) |
| values | `q8` / `q4` | one fp16 width w + k codes: round((max − lp) / w · L), L = 255 / 15 | no: |Δ lp| ≤ w/L + w/1000 |

The tail log-prob is always stored as float32, exactly as the teacher sent it: the K+1-class losses need the
mass outside the top-k. A lossy encoding decodes to values shifted by one constant per position so that the
k + 1 probabilities sum to 1 with that exact tail. The target log-prob (no loss reads it) is kept by the
float encodings (in their dtype) and dropped by `q8` / `q4`.

Why `delta` may reorder the ids: the K+1-class divergences (losses.py, sparse_kd.py) gather the student's
logits at the teacher's ids and sum over the k + 1 classes; no loss, metric or kernel reads the position of
an id in the list, so ids sorted by rank need no stored permutation (a reader that keeps only the first
top_k < k sorts by value first). The delta stream is split in two for a vectorized decode: the exp-Golomb
prefix lengths in unary (one bit stream) and the suffix bits (another); each packed row starts both on a byte.

SAMPLED answers (RS-KD: distinct drawn ids + their counts, -1 / 0 padded) use the same id coders (lists of
any length) and store the counts as uint8 or uint16.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from asymkd.packing import pack_ids, unpack_ids

ID_CODERS = ("packed", "delta")
VALUE_CODERS = ("fp32", "bf16", "fp16", "q8", "q4")
ENCODINGS = tuple(f"{i}-{v}" for i in ID_CODERS for v in VALUE_CODERS)
_LEVELS = {"q8": 255, "q4": 15}
_MAX_ORDER = 16  # exp-Golomb orders tried per list position


@dataclass(frozen=True)
class Encoding:
    ids: str
    values: str

    @property
    def name(self) -> str:
        return f"{self.ids}-{self.values}"

    @property
    def lossless(self) -> bool:
        return self.values == "fp32"

    @property
    def keeps_target(self) -> bool:
        return self.values not in _LEVELS


def parse_encoding(name: str) -> Encoding:
    if name not in ENCODINGS:
        raise ValueError(f"encoding={name!r} is not one of {list(ENCODINGS)}")
    ids, values = name.split("-")
    return Encoding(ids, values)


@dataclass
class Answers:
    """Teacher answers at the scored positions of n packed rows, the positions of all rows one after the other.

    lengths (n,) positions per row; ids (P, k) int64 (TOP_K; SAMPLED: distinct ids, -1 padded); logprobs
    (P, k) float32; tail (P,) float32; target (P,) float32; counts (P, k) int64 (SAMPLED, 0 padded)."""

    lengths: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray | None = None
    tail: np.ndarray | None = None
    target: np.ndarray | None = None
    counts: np.ndarray | None = None


def frequency_prefix(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """The ids that occur in `tokens`, most frequent first (ties by id): what a cache stores of the order."""
    counts = np.bincount(tokens.ravel().clip(0, vocab_size - 1), minlength=vocab_size)[:vocab_size]
    return np.argsort(-counts, kind="stable")[: int((counts > 0).sum())]


def order_from_prefix(prefix: np.ndarray, vocab_size: int) -> np.ndarray:
    """id_order (V,): the prefix, then every other id in increasing order (= argsort of frequency_order)."""
    rest = np.ones(vocab_size, dtype=bool)
    rest[prefix] = False
    return np.concatenate([prefix.astype(np.int64), np.flatnonzero(rest)])


def frequency_order(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """rank_of (V,) int64: the rank of each id when the vocabulary is sorted by frequency in `tokens` (most
    frequent first, ties by id). A teacher's top-k holds the frequent ids, so their ranks are small."""
    counts = np.bincount(tokens.ravel().clip(0, vocab_size - 1), minlength=vocab_size)[:vocab_size]
    order = np.argsort(-counts, kind="stable")
    rank_of = np.empty(vocab_size, dtype=np.int64)
    rank_of[order] = np.arange(vocab_size)
    return rank_of


# ------------------------------------------------------------------------------------------------ encode
def encode(ans: Answers, enc: Encoding, *, id_bits: int, rank_of: np.ndarray | None = None) -> dict:
    """The arrays of one shard (every name below is a 1-D or 2-D numpy array)."""
    out: dict[str, np.ndarray] = {"lengths": ans.lengths.astype(np.int64)}
    ids, lp, counts = ans.ids.astype(np.int64), ans.logprobs, ans.counts
    if enc.ids == "delta":
        keys = np.where(ids >= 0, rank_of[ids.clip(0)], np.iinfo(np.int64).max)  # -1 pads sort last
        perm = np.argsort(keys, axis=1, kind="stable")
        ids = np.take_along_axis(keys, perm, 1)
        lp = None if lp is None else np.take_along_axis(lp, perm, 1)
        counts = None if counts is None else np.take_along_axis(counts, perm, 1)
        out |= _delta_encode(ids, ans.lengths)
    else:
        out |= _packed_encode(ids + (counts is not None), ans.lengths, id_bits + (counts is not None))
    if lp is not None:
        out |= _values_encode(lp, enc.values, absolute=ans.tail is None)
    if ans.tail is not None:
        out["tail"] = ans.tail.astype(np.float32)
    if ans.target is not None and enc.keeps_target:
        out["target"] = _floats(ans.target, enc.values)
    if counts is not None:
        out["counts"] = counts.astype(np.uint8 if counts.max(initial=0) < 256 else np.uint16)
    return out


def _row_segments(pieces: list[np.ndarray], name: str) -> dict[str, np.ndarray]:
    """Byte blobs of every row, one after the other, and their byte offsets (n + 1,)."""
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    blob = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    return {name: blob.astype(np.uint8), f"{name}_off": offsets}


def _packed_encode(ids: np.ndarray, lengths: np.ndarray, bits: int) -> dict:
    starts = np.concatenate([[0], np.cumsum(lengths)])
    pieces = [np.frombuffer(pack_ids(ids[a:b], bits), dtype=np.uint8) for a, b in itertools.pairwise(starts)]
    return _row_segments(pieces, "ids") | {"ids_bits": np.array([bits], dtype=np.int64)}


def _floor_log2(x: np.ndarray) -> np.ndarray:
    return np.frexp(x.astype(np.float64))[1].astype(np.int64) - 1  # exact for integers < 2^53


def _lists(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted keys (P, k) with pads (int64 max) last -> (gaps of the flat valid keys, their list position,
    valid keys per position)."""
    valid = keys != np.iinfo(np.int64).max
    prev = np.concatenate([np.full((len(keys), 1), -1), keys[:, :-1]], axis=1)
    pos = np.broadcast_to(np.arange(keys.shape[1]), keys.shape)
    return (keys - prev - 1)[valid], pos[valid], valid.sum(1)


def _delta_encode(keys: np.ndarray, lengths: np.ndarray) -> dict:
    gaps, pos, per_list = _lists(keys)
    orders = _fit_orders(gaps, pos, keys.shape[1])
    k = orders[pos]
    u = (gaps >> k) + 1
    n = _floor_log2(u)
    mant = ((u - (1 << n)) << k) | (gaps & ((1 << k) - 1))
    first_value = np.concatenate([[0], np.cumsum(per_list)])  # per position
    row_starts = first_value[np.concatenate([[0], np.cumsum(lengths)])]  # per row, (n + 1,)
    unary, suffix = [], []
    for a, b in itertools.pairwise(row_starts):
        unary.append(_pack_unary(n[a:b]))
        suffix.append(_pack_varwidth(mant[a:b], n[a:b] + k[a:b]))
    out = _row_segments(unary, "ids_unary") | _row_segments(suffix, "ids_suffix")
    out["ids_orders"] = orders.astype(np.uint8)
    if (per_list != keys.shape[1]).any():  # SAMPLED: lists of any length
        out["ids_count"] = per_list.astype(np.uint16)
    return out


def _fit_orders(gaps: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
    """The exp-Golomb order with the fewest bits, per list position (fitted on up to 2^17 values)."""
    step = max(1, len(gaps) >> 16)
    g, p = gaps[::step], pos[::step]
    cost = [np.bincount(p, 2 * _floor_log2((g >> o) + 1) + o, minlength=k) for o in range(_MAX_ORDER)]
    return np.argmin(np.stack(cost), axis=0)


def _pack_unary(n: np.ndarray) -> np.ndarray:
    """n[i] zeros then a one, for each i; little-endian bit order."""
    bits = np.zeros(int(n.sum()) + len(n), dtype=np.uint8)
    bits[np.cumsum(n + 1) - 1] = 1
    return np.packbits(bits, bitorder="little")


def _pack_varwidth(values: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The low width[i] bits of values[i], one after the other, little-endian bit order (width <= 56): each
    value ORed into the 64-bit word where it starts, its high bits into the next (little-endian words)."""
    if not len(values):
        return np.zeros(0, dtype=np.uint8)
    offsets = np.cumsum(width) - width
    total = int(offsets[-1] + width[-1])
    v, shift, word = values.astype(np.uint64), (offsets & 63).astype(np.uint64), offsets >> 6
    words = np.zeros(total // 64 + 2, dtype="<u8")
    for part, where in ((v << shift, word), ((v >> np.uint64(1)) >> (np.uint64(63) - shift), word + 1)):
        starts = np.flatnonzero(np.diff(where, prepend=-1))  # `where` never decreases: one run per word
        words[where[starts]] |= np.bitwise_or.reduceat(part, starts)
    return words.view(np.uint8)[: (total + 7) // 8].copy()


def _floats(x: np.ndarray, values: str) -> np.ndarray:
    if values == "fp32":
        return x.astype(np.float32)
    if values == "fp16":
        return x.astype(np.float16)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).bfloat16().view(torch.int16).numpy()


def _values_encode(lp: np.ndarray, values: str, absolute: bool) -> dict:
    """Float values, or codes + width; `absolute` (no tail to renormalize with, SAMPLED): + each max, fp32."""
    if values not in _LEVELS:
        return {"logprobs": _floats(lp, values)}
    levels = _LEVELS[values]
    finite = np.isfinite(lp)
    hi = np.where(finite, lp, -np.inf).max(1, keepdims=True)
    lo = np.where(finite, lp, np.inf).min(1, keepdims=True)
    width = np.where(np.isfinite(hi - lo), hi - lo, 0.0).astype(np.float16)  # the width the reader sees
    w = width.astype(np.float64)
    scaled = np.divide(hi - lp, w, out=np.zeros_like(lp, dtype=np.float64), where=w > 0)
    codes = (
        np.nan_to_num(np.rint(scaled * levels), nan=levels, posinf=levels).clip(0, levels).astype(np.uint8)
    )
    if values == "q4":
        codes = np.pad(codes, ((0, 0), (0, codes.shape[1] % 2)))
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    out = {"codes": codes, "width": width[:, 0]}
    return out | ({"offset": np.where(np.isfinite(hi), hi, 0.0)[:, 0].astype(np.float32)} if absolute else {})


# ------------------------------------------------------------------------------------------------ decode
class ShardArrays(Protocol):
    """One shard's arrays, read lazily: `get(name, a, b)` = name[a:b]; `names` = the arrays it holds."""

    names: frozenset[str]

    def get(self, name: str, a: int, b: int) -> np.ndarray: ...


def decode(
    shard: ShardArrays, enc: Encoding, *, row: int, pos: tuple[int, int], k: int, id_order: np.ndarray | None
) -> Answers:
    """The answers of the shard's local row `row`, whose positions are [pos[0], pos[1]); `id_order` (V,) =
    the vocabulary by rank (delta encodings). SAMPLED answers come back with counts, no values."""
    a, b = pos
    sampled = "counts" in shard.names
    if enc.ids == "delta":
        ids = _delta_decode(shard, row, pos, k)
        ids = np.where(ids >= 0, id_order[ids.clip(0)], -1)
    else:
        off_a, off_b = shard.get("ids_off", row, row + 2)
        bits = int(shard.get("ids_bits", 0, 1)[0])
        blob = shard.get("ids", int(off_a), int(off_b))
        if bits in (8, 16, 32):  # whole bytes: pack_ids' layout is little-endian integers
            ids = blob.view(f"<u{bits // 8}").reshape(b - a, k).astype(np.int64) - sampled
        else:
            ids = unpack_ids(blob.tobytes(), bits, (b - a, k)).numpy() - sampled
    ans = Answers(lengths=np.array([b - a]), ids=ids)
    if sampled:
        ans.counts = shard.get("counts", a, b).astype(np.int64)
    if "tail" in shard.names:
        ans.tail = shard.get("tail", a, b)
    if "logprobs" in shard.names or "codes" in shard.names:
        ans.logprobs = _values_decode(shard, enc.values, pos, k, ans.tail)
        if sampled:  # log-probs at the draws; padding has none
            ans.logprobs[ans.ids < 0] = -np.inf
    if "target" in shard.names:
        ans.target = _floats_decode(shard.get("target", a, b), enc.values)
    return ans


def _delta_decode(shard: ShardArrays, row: int, pos: tuple[int, int], k: int) -> np.ndarray:
    a, b = pos
    orders = shard.get("ids_orders", 0, k).astype(np.int64)
    if "ids_count" in shard.names:
        per_list = shard.get("ids_count", a, b).astype(np.int64)
    else:
        per_list = np.full(b - a, k, dtype=np.int64)
    count = int(per_list.sum())
    starts = np.cumsum(per_list) - per_list
    list_pos = np.arange(count) - np.repeat(starts, per_list)
    ua, ub = shard.get("ids_unary_off", row, row + 2)
    ones = np.flatnonzero(np.unpackbits(shard.get("ids_unary", int(ua), int(ub)), bitorder="little"))
    n = np.diff(ones[:count], prepend=-1) - 1
    o = orders[list_pos]
    sa, sb = shard.get("ids_suffix_off", row, row + 2)
    mant = _unpack_varwidth(shard.get("ids_suffix", int(sa), int(sb)), n + o)
    gaps = (((1 << n) + (mant >> o) - 1) << o) | (mant & ((1 << o) - 1))
    run = np.cumsum(gaps + 1)
    before = np.concatenate([[0], run])[starts]  # sum of (gap + 1) before each list
    keys = run - np.repeat(before, per_list) - 1
    out = np.full((b - a, k), -1, dtype=np.int64)
    out[np.repeat(np.arange(b - a), per_list), list_pos] = keys
    return out


def _unpack_varwidth(blob: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The inverse of _pack_varwidth: one unaligned 64-bit read per value (a view with a 1-byte stride)."""
    offsets = np.cumsum(width) - width
    padded = np.concatenate([blob, np.zeros(8, dtype=np.uint8)])
    words = np.ndarray((len(blob) + 1,), dtype="<u8", buffer=padded, strides=(1,))[offsets >> 3]
    mask = (np.uint64(1) << width.astype(np.uint64)) - np.uint64(1)
    return ((words >> (offsets & 7).astype(np.uint64)) & mask).astype(np.int64)


def _floats_decode(x: np.ndarray, values: str) -> np.ndarray:
    if values == "bf16":
        return torch.from_numpy(np.ascontiguousarray(x)).view(torch.bfloat16).float().numpy()
    return x.astype(np.float32)


def _values_decode(
    shard: ShardArrays, values: str, pos: tuple[int, int], k: int, tail: np.ndarray | None
) -> np.ndarray:
    """Decoded values; with a tail (TOP_K) lossy ones are renormalized to it, else (SAMPLED) left as read."""
    a, b = pos
    if values not in _LEVELS:
        lp = _floats_decode(shard.get("logprobs", a, b), values)
        return lp if values == "fp32" or tail is None else renormalize(lp, tail)
    codes = shard.get("codes", a, b)
    if values == "q4":
        codes = np.stack([codes & 15, codes >> 4], axis=2).reshape(len(codes), 2 * codes.shape[1])[:, :k]
    width = shard.get("width", a, b).astype(np.float32)
    lp = codes.astype(np.float32) * (-width[:, None] / _LEVELS[values])
    return renormalize(lp, tail) if tail is not None else lp + shard.get("offset", a, b)[:, None]


def renormalize(lp: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Shift each position's k log-probs by one constant so that they and the exact tail hold all the mass."""
    top = np.log(-np.expm1(tail.astype(np.float64)))  # log(1 - e^tail); -inf tail -> 0
    m = np.max(lp, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    lse = m[:, 0] + np.log(np.exp(lp - m).sum(1))
    return (lp + (top - lse)[:, None]).astype(np.float32)
