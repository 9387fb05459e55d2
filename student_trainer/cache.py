"""Offline teacher-logit cache: score the training rows once, then train any number of students (and epochs)
from disk with no teacher running.

    asymkd cache write --config train.yaml --out DIR     # the config's teacher.targets score data's rows
    asymkd cache info DIR                                 # what a cache holds
    asymkd train --config train.yaml --teacher.cache DIR  # train from it: no teacher at train time

`write` packs the training split exactly as `asymkd train` does (same data, tokenizer, seq_len), sends every
packed row once, in order, through the live teacher feed (sources/live.py: prefetch, retries, the GetInfo handshake)
and stores the TOP_K answers laid out as the trainer sees them (rows aligned with logits[:, :-1]):

    DIR/manifest.json                    format, rows, seq_len, rows_sha256 (the packed tokens and loss mask),
                                         tokenizer_hash, teacher {model, backend, vocab_size, ...}, top_k, T
    DIR/shard-00000.safetensors ...      rows [start, end): valid (n, T-1) uint8, ids (n, T-1, k) int32,
                                         logprobs (n, T-1, k) fp32, tail_logprob (n, T-1) fp32,
                                         target_logprob (n, T-1) fp32

Training from a cache (`sources/cache.py`, `CachedTeacher`) checks, before the first step, that the trainer packed the very
same rows (rows_sha256; any change of data, tokenizer or seq_len changes it) and runs the teacher handshake on
the teacher's facts stored in the manifest (tokenizer hash, vocabulary, padded-vocab rule). A cache of top-k
serves any `distill.top_k` ≤ k: the ids beyond are folded exactly into the tail bucket. `distill.temperature`
must be the cache's (the teacher's log-probs are at that T). Rows are read lazily (memory-mapped shards), so a
cache larger than memory works; each rank reads only its own rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from asymkd.config import ConfigError
from student_trainer.config import CacheWriteConfig, client_options

log = logging.getLogger("asymkd.student.cache")
FORMAT = "asymkd-teacher-cache/1"
FIELDS = ("valid", "ids", "logprobs", "tail_logprob", "target_logprob")
INFO_KEYS = ("model", "backend", "vocab_size", "tokenizer_hash", "tokenizer_vocab_size", "max_top_k", "dtype")


def rows_sha256(rows: Any) -> str:
    """Fingerprint of packed rows (PackedRows: tokens + loss mask): equal iff the trainer packed the same rows."""
    h = hashlib.sha256()
    h.update(json.dumps([list(rows.tokens.shape), str(rows.tokens.dtype)]).encode())
    h.update(rows.tokens.tobytes())
    h.update(rows.mask.tobytes())
    return h.hexdigest()


def read_manifest(path: Path) -> dict:
    """A cache folder's manifest; ConfigError (naming `teacher.cache`) when the folder is no cache."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.cache: {path} is not a teacher cache ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"teacher.cache: {path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


# ------------------------------------------------------------------------------------------------- write
def write_cache(cfg: CacheWriteConfig) -> dict:
    """Score every packed training row once through `cfg.teacher.targets`; write shards + manifest to
    `cfg.out` (`cfg.shard_rows` rows per shard). Returns the manifest."""
    from asymkd.contract import tokenizer_hash
    from student_trainer.data import PackedDataset, load_packs, tokenizer_id
    from student_trainer.model import load_tokenizer
    from student_trainer.sources.base import StudentSide
    from student_trainer.sources.live import TeacherFeed
    from teacher_server.client import TeacherClient

    if not cfg.teacher.targets:
        raise ConfigError("teacher.targets: `asymkd cache write` needs teacher servers to score the rows")
    if cfg.distill.signal != "top_k":
        raise ConfigError(f"distill.signal={cfg.distill.signal!r}: the cache holds TOP_K answers only")
    out = Path(cfg.out)
    tokenizer, tok_dir = load_tokenizer(cfg.model)
    try:  # rank 0's view of the whole training split, packed as the trainer packs it
        rows = load_packs(cfg.data, tokenizer, tokenizer_id(tok_dir))["train"]
    except (FileNotFoundError, KeyError) as e:
        raise ConfigError(f"data: {e}") from None
    n, mbs = len(rows), cfg.optim.micro_batch_size
    client = TeacherClient(cfg.teacher.targets, **client_options(cfg.teacher))
    try:
        vocab = client.info().vocab_size  # the teacher's own ids; students are checked at read time
    finally:
        client.close()
    data = PackedDataset(rows, micro_batch_size=mbs, shuffle=False)
    batches = itertools.islice(data.batches(), math.ceil(n / mbs))
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # written last: a folder without it is no cache
    for old in out.glob("shard-*.safetensors"):
        old.unlink()
    shards, pending, t0 = [], [], time.perf_counter()
    tok_hash = tokenizer_hash(tok_dir)
    student = StudentSide(vocab_size=vocab, tokenizer_hash=tok_hash, seq_len=int(rows.tokens.shape[1]))
    feed = TeacherFeed(batches, cfg.teacher, cfg.distill, student)
    try:
        info = {k: getattr(feed.info, k) for k in INFO_KEYS}
        for mb in feed:
            for i, sid in enumerate(mb.batch["sample_ids"].tolist()):
                if sid < n:  # the last batch wraps into the next epoch: those rows are written already
                    pending.append({f: getattr(mb.teacher, f)[i] for f in FIELDS})
                if len(pending) == cfg.shard_rows:
                    shards.append(_write_shard(out, len(shards), sum(s["rows"] for s in shards), pending))
                    pending = []
    finally:
        feed.close()
    if pending:
        shards.append(_write_shard(out, len(shards), sum(s["rows"] for s in shards), pending))
    manifest = {
        "format": FORMAT, "rows": n, "seq_len": int(rows.tokens.shape[1]), "rows_sha256": rows_sha256(rows),
        "tokenizer_hash": tok_hash, "teacher": info, "top_k": cfg.distill.top_k,
        "temperature": cfg.distill.temperature, "shards": shards, "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_shard(out: Path, index: int, start: int, rows: list[dict]) -> dict:
    from safetensors.torch import save_file

    name = f"shard-{index:05d}.safetensors"
    tensors = {
        "valid": torch.stack([r["valid"] for r in rows]).to(torch.uint8),
        "ids": torch.stack([r["ids"] for r in rows]).to(torch.int32),
        "logprobs": torch.stack([r["logprobs"] for r in rows]).float(),
        "tail_logprob": torch.stack([r["tail_logprob"] for r in rows]).float(),
    }
    if rows[0]["target_logprob"] is not None:
        tensors["target_logprob"] = torch.stack([r["target_logprob"] for r in rows]).float()
    save_file(tensors, str(out / name))
    return {"file": name, "start": start, "rows": len(rows)}
