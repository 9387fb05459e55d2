"""The cache folder on disk: manifest, shard files, reading rows back (formats 2 and 1), appending rows.

    store = CacheStore(Path(DIR))             # manifest + every shard's row index; nothing else is read yet
    store.has(row); store.answers(row)        # codec.Answers of one packed row, from memory-mapped shards
    summarize(Path(DIR))                      # what `asymkd cache info` prints

A folder holds `manifest.json` (the settings every shard was written with: format, signal, encoding, top_k,
temperature, the rows fingerprint, the teacher's facts, the data; rewritten with totals when a write ends),
`vocab.safetensors` (delta encodings: the ids of the training tokens by frequency) and shard files `shard-*.safetensors`, each
self-describing: its packed-row indices (`row_index`), positions per row and encoded arrays (codec.py).
Every file is written to a temporary name and renamed into place, so a shard that exists is whole; readers
find shards by listing the folder (a cache being appended to gains rows while it is read). Files get the
mode any file the user creates gets (0644 under the usual umask): a cache is shared data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asymkd.config import ConfigError
from student_trainer.cache.codec import (
    Answers,
    Encoding,
    decode,
    frequency_prefix,
    order_from_prefix,
    parse_encoding,
)

log = logging.getLogger("asymkd.student.cache")
FORMAT = "asymkd-teacher-cache/2"
FORMAT_V1 = "asymkd-teacher-cache/1"
_V1_FIELDS = ("valid", "ids", "logprobs", "tail_logprob", "target_logprob")
INFO_KEYS = ("model", "backend", "vocab_size", "tokenizer_hash", "tokenizer_vocab_size", "max_top_k", "dtype")
_SMALL = ("row_index", "lengths", "ids_off", "ids_unary_off", "ids_suffix_off", "ids_orders", "ids_bits")


def rows_sha256(rows: Any) -> str:
    """Fingerprint of packed rows (PackedRows: tokens + loss mask): equal iff the trainer packed the same rows."""
    h = hashlib.sha256()
    h.update(json.dumps([list(rows.tokens.shape), str(rows.tokens.dtype)]).encode())
    h.update(rows.tokens.tobytes())
    h.update(rows.mask.tobytes())
    return h.hexdigest()


def read_manifest(path: Path) -> dict:
    """A cache folder's manifest (format 2 or 1); ConfigError (naming `teacher.cache`) when it is no cache."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.cache: {path} is not a teacher cache ({e})") from None
    if manifest.get("format") not in (FORMAT, FORMAT_V1):
        raise ConfigError(
            f"teacher.cache: {path} has format {manifest.get('format')!r}, expected {FORMAT!r} or {FORMAT_V1!r}"
        )
    return manifest


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(path: Path, manifest: dict) -> None:
    write_atomic(path / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def write_shard(path: Path, name: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> int:
    """One shard file (safetensors: no pickle, memory-mapped reads); returns its size in bytes."""
    from safetensors.numpy import save

    # One metadata key: safetensors writes several in hash order, and a shard must be the same bytes each time.
    meta = {"asymkd": json.dumps(metadata, sort_keys=True)}
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
    write_atomic(path / name, data)
    return len(data)


def write_vocab(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """The vocabulary order of delta encodings: the ids seen in the training tokens, most frequent first
    (codec.frequency_prefix; the ids never seen follow in increasing order, unstored)."""
    from safetensors.numpy import save

    prefix = frequency_prefix(tokens, vocab_size).astype(np.int32)
    write_atomic(path / "vocab.safetensors", save({"id_order_prefix": prefix}))


def shard_files(path: Path) -> list[Path]:
    return sorted(path.glob("shard-*.safetensors"))


def disk_bytes(path: Path) -> tuple[int, int]:
    """(every file of the folder, its data: shards + vocabulary) in bytes; bytes/token counts the data."""
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sum(p.stat().st_size for p in files), sum(
        p.stat().st_size for p in files if p.suffix == ".safetensors"
    )


SIGNALS = ("top_k", "sampled")  # what a cache holds


def signal_keys(distill: Any) -> dict:
    """The manifest's keys for what the answers are: signal, k per position (top_k, or num_samples for
    SAMPLED, with its seed: the draws depend on it), temperature."""
    out = {"signal": distill.signal, "top_k": distill.top_k, "temperature": distill.temperature}
    if distill.signal == "sampled":
        out |= {
            "top_k": distill.num_samples,
            "num_samples": distill.num_samples,
            "sample_seed": distill.sample_seed,
        }
    return out


def row_answers(teacher: Any, i: int) -> Answers:
    """Row i of a TeacherBatch (its scored positions: a suffix of the row) as Answers, on the CPU."""
    valid = teacher.valid[i].cpu()
    first = int(valid.to(torch.int8).argmax()) if bool(valid.any()) else len(valid)
    if not bool(valid[first:].all()):
        raise ValueError(
            f"row {i}: the scored positions are not one run from the first (the cache needs that)"
        )

    def part(name: str) -> np.ndarray | None:
        t = getattr(teacher, name, None)
        return None if t is None else t[i, first:].detach().cpu().numpy()

    return Answers(
        lengths=np.array([len(valid) - first]), ids=part("ids"), logprobs=part("logprobs"),
        tail=part("tail_logprob"), target=part("target_logprob"), counts=part("counts"),
    )  # fmt: skip


def concat(rows: list[Answers]) -> Answers:
    """Answers of several rows, one after the other."""

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(r, name) for r in rows]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    return Answers(
        lengths=np.concatenate([r.lengths for r in rows]), ids=cat("ids"), logprobs=cat("logprobs"),
        tail=cat("tail"), target=cat("target"), counts=cat("counts"),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- read
class Shard:
    """A format-2 shard: small index arrays in memory, the rest sliced from the memory-mapped file."""

    def __init__(self, file: Path) -> None:
        from safetensors import safe_open

        self.file = file
        self._f = safe_open(str(file), framework="numpy")
        self.meta = json.loads((self._f.metadata() or {}).get("asymkd", "{}"))
        self.names = frozenset(self._f.keys())
        self._small = {n: self._f.get_tensor(n) for n in _SMALL if n in self.names}
        self.rows = self._small["row_index"]
        self.pos = np.concatenate([[0], np.cumsum(self._small["lengths"])])

    def get(self, name: str, a: int, b: int) -> np.ndarray:
        if name in self._small:
            return self._small[name][a:b]
        return self._f.get_slice(name)[a:b]

    def answers(self, local: int, enc: Encoding, k: int, id_order: np.ndarray | None) -> Answers:
        span = (int(self.pos[local]), int(self.pos[local + 1]))
        return decode(self, enc, row=local, pos=span, k=k, id_order=id_order)


class ShardV1:
    """A format-1 shard: rows [start, start + n), dense (n, T-1, ...) arrays with a `valid` mask."""

    def __init__(self, file: Path, start: int, rows: int) -> None:
        from safetensors import safe_open

        self._f = safe_open(str(file), framework="numpy")
        self.names = frozenset(self._f.keys())
        self.rows = np.arange(start, start + rows)

    def answers(self, local: int, enc: Encoding, k: int, id_order: np.ndarray | None) -> Answers:
        got = {n: self._f.get_slice(n)[local] for n in _V1_FIELDS if n in self.names}
        valid = got["valid"].astype(bool)
        first = int(valid.argmax()) if valid.any() else len(valid)
        target = got.get("target_logprob")
        return Answers(
            lengths=np.array([len(valid) - first]),
            ids=got["ids"][first:].astype(np.int64),
            logprobs=got["logprobs"][first:],
            tail=got["tail_logprob"][first:],
            target=None if target is None else target[first:],
        )


class CacheStore:
    """Read access to a cache folder: which packed rows it holds, and their answers (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest = m = read_manifest(path)
        self.v1 = m["format"] == FORMAT_V1
        self.encoding = parse_encoding(m.get("encoding", "packed-fp32"))
        self.signal, self.k = m.get("signal", "top_k"), int(m["top_k"])
        self.id_order = None
        if self.encoding.ids == "delta":
            from safetensors.numpy import load_file

            prefix = load_file(str(path / "vocab.safetensors"))["id_order_prefix"]
            self.id_order = order_from_prefix(prefix, int(m["teacher"]["vocab_size"]))
        self.shards: list[Shard | ShardV1] = []
        self._where: dict[int, tuple[int, int]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Pick up shard files written since (another rank's appends, a write in progress)."""
        if self.v1:
            if not self.shards:
                for s in self.manifest["shards"]:
                    self._add(ShardV1(self.path / s["file"], s["start"], s["rows"]))
            return
        known = {s.file for s in self.shards}
        for file in shard_files(self.path):
            if file not in known:
                self._add(Shard(file))

    def _add(self, shard: Shard | ShardV1) -> None:
        if isinstance(shard, Shard) and shard.meta.get("encoding") != self.encoding.name:
            raise ConfigError(
                f"teacher.cache: {shard.file} holds encoding {shard.meta.get('encoding')!r}, the manifest "
                f"{self.encoding.name!r}"
            )
        index = len(self.shards)
        self.shards.append(shard)
        for local, row in enumerate(shard.rows.tolist()):
            self._where.setdefault(row, (index, local))  # a row written twice (appends): the first copy

    @property
    def rows_cached(self) -> int:
        return len(self._where)

    def has(self, row: int) -> bool:
        return row in self._where

    def answers(self, row: int) -> Answers:
        shard, local = self._where[row]
        return self.shards[shard].answers(local, self.encoding, self.k, self.id_order)

    def close(self) -> None:
        self.shards, self._where = [], {}


# ------------------------------------------------------------------------------------------------- info
def summarize(path: Path) -> dict:
    """The manifest with what the folder holds now (`asymkd cache info --json`): rows_cached, complete, tokens,
    bytes_on_disk, bytes_per_token (shards + vocabulary / tokens), shard_files (appends and a write in progress
    included)."""
    cache = CacheStore(path)
    m = dict(cache.manifest)
    disk, data = disk_bytes(path)
    if cache.v1:  # format 1 kept every row position: tokens = the valid ones
        tokens = sum(int(s._f.get_tensor("valid").sum()) for s in cache.shards)
    else:
        tokens = sum(int(s.pos[-1]) for s in cache.shards)
    m |= {
        "path": str(path), "rows_cached": cache.rows_cached, "complete": cache.rows_cached == m["rows"], "tokens": tokens,
        "bytes_on_disk": disk, "bytes_per_token": round(data / tokens, 2) if tokens else None,
        "shard_files": len(cache.shards),
    }  # fmt: skip
    cache.close()
    return m


def describe(m: dict) -> str:
    """`asymkd cache info DIR`: a summary a person reads."""
    t, data = m["teacher"], m.get("data") or {}
    enc = m.get("encoding", "packed-fp32 (format 1: int32 ids, fp32 values, every row position)")
    exact = "lossless" if enc.split("-")[1].startswith("fp32") else "values lossy, tail exact"
    source = f"builtin {data['builtin']}" if data.get("builtin") else ", ".join(data.get("paths", [])) or "?"
    writer = m.get("writer", {})
    lines = [
        f"cache       {m.get('path', '')}  ({m['format']}, {'complete' if m['complete'] else 'PARTIAL'})",
        f"rows        {m['rows_cached']:,} of {m['rows']:,} packed rows of {m['seq_len']} tokens; "
        f"{m['tokens']:,} tokens scored",
        f"size        {m['bytes_on_disk'] / 1e6:,.1f} MB on disk, {m['bytes_per_token']} B/token, "
        f"{m['shard_files']} shard files",
        f"encoding    {enc} ({exact})",
        f"signal      {_signal(m)}, temperature {m['temperature']}",
        f"teacher     {t['model']} ({t['backend']}, {t.get('dtype') or '?'}, vocab {t['vocab_size']:,})",
        f"data        {source} (seq_len {m['seq_len']}{_eval(data)})",
        f"fingerprint rows_sha256 {m['rows_sha256']}",
        f"            tokenizer {m['tokenizer_hash']}",
    ]
    if writer:
        lines.append(f"written     from teacher.{writer['source']} by {writer['world_size']} rank(s) in "
                     f"{writer['seconds']} s")  # fmt: skip
    return "\n".join(lines)


def _signal(m: dict) -> str:
    if m.get("signal") == "sampled":
        return f"sampled, num_samples {m['num_samples']}, sample_seed {m['sample_seed']}"
    return f"top_k, top_k {m['top_k']}"


def _eval(data: dict) -> str:
    return f", eval_fraction {data['eval_fraction']}" if data.get("eval_fraction") else ""
