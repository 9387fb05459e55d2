"""Offline teacher-logit cache: score the training rows once, then train any number of students (and epochs)
from disk with no teacher running.

    asymkd cache write --config train.yaml --out DIR     # the config's teacher.targets score data's rows
    asymkd cache info DIR                                 # what a cache holds
    asymkd train --config train.yaml --teacher.cache DIR  # train from it: no teacher at train time

`write` packs the training split exactly as `asymkd train` does (same data, tokenizer, seq_len), sends every
packed row once, in order, through the teacher feed (TeacherFeed: prefetch, retries, the GetInfo handshake)
and stores the TOP_K answers laid out as the trainer sees them (rows aligned with logits[:, :-1]):

    DIR/manifest.json                    format, rows, seq_len, rows_sha256 (the packed tokens and loss mask),
                                         tokenizer_hash, teacher {model, backend, vocab_size, ...}, top_k, T
    DIR/shard-00000.safetensors ...      rows [start, end): valid (n, T-1) uint8, ids (n, T-1, k) int32,
                                         logprobs (n, T-1, k) fp32, tail_logprob (n, T-1) fp32,
                                         target_logprob (n, T-1) fp32

Training from a cache (`CachedTeacherFeed`) checks, before the first step, that the trainer packed the very
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
import sys
import time
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from asymkd.configs import ConfigError
from student_trainer.config import DistillSection, TeacherSection, TrainConfig
from student_trainer.teacher_feed import FedBatch, TeacherBatch, TeacherCompatError, negotiate

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


# ------------------------------------------------------------------------------------------------- write
def _train_rows(cfg: TrainConfig) -> tuple[Any, Any, Path]:
    """The packed training rows exactly as the trainer builds them (rank 0's view of the whole split)."""
    from student_trainer.data import load_packs
    from student_trainer.model import load_tokenizer
    from teacher_server.models import tokenizer_hash

    try:
        tokenizer, tok_dir = load_tokenizer(cfg.model)
        tok_id = tokenizer_hash(tok_dir) or str(tok_dir.resolve())
        packs = load_packs(cfg.data, tokenizer, tok_id, rank=0)
    except (FileNotFoundError, KeyError) as e:
        raise ConfigError(f"data: {e}") from None
    return packs["train"], tokenizer, tok_dir


def write_cache(cfg: TrainConfig, out: Path, *, shard_rows: int = 1024) -> dict:
    """Score every packed training row once through `cfg.teacher.targets`; write shards + manifest to `out`."""
    from student_trainer.data import PackedDataset
    from student_trainer.teacher_feed import TeacherFeed
    from teacher_server.client import TeacherClient
    from teacher_server.models import tokenizer_hash

    if not cfg.teacher.targets:
        raise ConfigError("teacher.targets: `asymkd cache write` needs teacher servers to score the rows")
    if cfg.distill.signal != "top_k":
        raise ConfigError(f"distill.signal={cfg.distill.signal!r}: the cache holds TOP_K answers only")
    if shard_rows < 1:
        raise ConfigError(f"--shard-rows must be >= 1, got {shard_rows}")
    rows, _, tok_dir = _train_rows(cfg)
    n, mbs = len(rows), cfg.optim.micro_batch_size
    client = TeacherClient(cfg.teacher.targets, timeout_s=cfg.teacher.timeout_s)
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
    with TeacherFeed(batches, cfg.teacher, cfg.distill, vocab_size=vocab, tokenizer_hash=tok_hash) as feed:
        info = {k: getattr(feed.info, k, None) for k in INFO_KEYS}
        for fed in feed:
            for i, sid in enumerate(fed.batch["sample_ids"].tolist()):
                if sid < n:  # the last batch wraps into the next epoch: those rows are written already
                    pending.append({f: getattr(fed.teacher, f)[i] for f in FIELDS})
                if len(pending) == shard_rows:
                    shards.append(_write_shard(out, len(shards), sum(s["rows"] for s in shards), pending))
                    pending = []
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


# -------------------------------------------------------------------------------------------------- read
def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.cache: {path} is not a teacher cache ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"teacher.cache: {path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class CachedTeacherFeed:
    """FedBatch items from an offline cache (see the module docstring); the TeacherFeed interface."""

    depth = 0

    def __init__(
        self,
        batches: Iterable[dict],
        teacher: TeacherSection,
        distill: DistillSection,
        *,
        vocab_size: int,
        tokenizer_hash: str,
        rows: Any,
    ) -> None:
        from safetensors import safe_open

        self.path = Path(teacher.cache)
        m = self.manifest = read_manifest(self.path)
        if m["rows_sha256"] != rows_sha256(rows):
            raise ConfigError(
                f"teacher.cache: {self.path} was written for other training rows ({m['rows']} rows of "
                f"{m['seq_len']} tokens; the trainer packed {len(rows)} of {rows.tokens.shape[1]}): the data, "
                "tokenizer or data.seq_len differ from the config it was written with"
            )
        if distill.signal != "top_k" or distill.top_k > m["top_k"]:
            raise ConfigError(
                f"distill.signal={distill.signal!r} top_k={distill.top_k}: the cache holds top_k={m['top_k']}"
            )
        if not math.isclose(distill.temperature, m["temperature"]):
            raise ConfigError(
                f"distill.temperature={distill.temperature}: the cache is at T={m['temperature']}"
            )
        self.info = SimpleNamespace(**m["teacher"], signals=())
        try:
            negotiate(self.info, distill, teacher, vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
        except TeacherCompatError as e:
            raise ConfigError(f"teacher.cache: {e}") from None
        self.top_k, self.vocab_size = distill.top_k, vocab_size
        self._starts = [s["start"] for s in m["shards"]]
        self._files = [safe_open(str(self.path / s["file"]), framework="pt") for s in m["shards"]]
        self._keys = [set(f.keys()) for f in self._files]
        self._data = iter(batches)
        log.info("teacher cache %s: %d rows, top_k %d -> %d, teacher %s", self.path, m["rows"], m["top_k"],
                 self.top_k, m["teacher"]["model"])  # fmt: skip

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """One packed row's teacher answer (lazily read from its shard)."""
        shard = bisect_right(self._starts, index) - 1
        f, local = self._files[shard], index - self._starts[shard]
        return {name: f.get_slice(name)[local] for name in FIELDS if name in self._keys[shard]}

    def lookup(self, sample_ids: torch.Tensor) -> TeacherBatch:
        n, k = self.manifest["rows"], self.top_k
        got = [self.row(int(s) % n) for s in sample_ids.tolist()]
        lp = torch.stack([g["logprobs"] for g in got])
        ids = torch.stack([g["ids"] for g in got]).long()
        tail = torch.stack([g["tail_logprob"] for g in got])
        if k < lp.shape[-1]:  # fold the ids beyond top_k into the tail bucket, exactly
            tail = torch.cat([tail.unsqueeze(-1), lp[..., k:]], -1).logsumexp(-1)
            ids, lp = ids[..., :k], lp[..., :k]
        if bool((ids >= self.vocab_size).any()):
            raise ConfigError(
                f"teacher.cache: teacher ids >= the student's vocab_size {self.vocab_size} among the top-{k}"
            )
        target = torch.stack([g["target_logprob"] for g in got]) if "target_logprob" in got[0] else None
        valid = torch.stack([g["valid"] for g in got]).bool()
        return TeacherBatch(valid=valid, ids=ids, logprobs=lp, tail_logprob=tail, target_logprob=target)

    def __iter__(self) -> Iterator[FedBatch]:
        for index, batch in enumerate(self._data):
            t0 = time.perf_counter()
            teacher = self.lookup(batch["sample_ids"])
            yield FedBatch(batch, teacher, (time.perf_counter() - t0) * 1e3, index)

    def close(self) -> None:
        self._files = []

    def __enter__(self) -> CachedTeacherFeed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------- CLI
USAGE = """usage: asymkd cache write --config train.yaml --out DIR [--shard-rows N] [--section.key value ...]
       asymkd cache info DIR"""


def main(argv: list[str]) -> int:
    from student_trainer.cli import parse_train_args
    from student_trainer.observability import setup_logging

    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in ("write", "info"):
        what = f"unknown command {argv[0]!r}" if argv else "a command is needed"
        print(f"asymkd cache: {what}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        if argv[0] == "info":
            if len(argv) != 2:
                raise ConfigError("`asymkd cache info` takes one folder")
            m = read_manifest(Path(argv[1]))
            m["shards"] = len(m["shards"])
            print(json.dumps(m, indent=2))
            return 0
        rest, out, shard_rows = list(argv[1:]), None, 1024
        for flag in ("--out", "--shard-rows"):
            if flag in rest:
                i = rest.index(flag)
                if i + 1 >= len(rest):
                    raise ConfigError(f"{flag} needs a value")
                value = rest[i + 1]
                del rest[i : i + 2]
                out, shard_rows = (Path(value), shard_rows) if flag == "--out" else (out, int(value))
        if out is None:
            raise ConfigError("--out DIR is required")
        cfg = parse_train_args(rest)
        setup_logging(0)
        m = write_cache(cfg, out, shard_rows=shard_rows)
    except (ConfigError, ValueError) as e:
        print(f"asymkd cache: config error: {e}", file=sys.stderr)
        return 2
    shards, secs = len(m["shards"]), m["seconds"]
    print(f"wrote {m['rows']} rows (top_k {m['top_k']}) in {shards} shards to {out} ({secs} s)")
    return 0
