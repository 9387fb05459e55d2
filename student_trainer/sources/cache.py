"""The offline teacher cache as a teacher source (`teacher.cache: DIR`, written by `asymkd cache write`).

    source = CachedTeacher(batches, cfg.teacher, cfg.distill, StudentSide(..., rows=packed_train_rows))
    for mb in source:           # MicroBatch: each row's teacher answer read from the cache by its sample id
        step(mb.batch, mb.teacher)

Before the first step it checks that the trainer packed the very same rows (rows_sha256; any change of data,
tokenizer or seq_len changes it), the signal, top_k and temperature, and runs the handshake
(`common.negotiate`) on the teacher's facts stored in the manifest (tokenizer hash, vocabulary, padded-vocab
rule). A cache of top-k serves any `distill.top_k` <= k: the ids beyond are folded exactly into the tail
bucket. Rows are read lazily from memory-mapped safetensors shards, so a cache larger than memory works; each
rank reads only its own rows. The format and the writer are in student_trainer/cache.py.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from asymkd.config import ConfigError
from asymkd.contract import TeacherInfo
from student_trainer.cache import FIELDS, read_manifest, rows_sha256
from student_trainer.config import DistillSection, TeacherSection
from student_trainer.sources.base import MicroBatch, StudentSide, TeacherBatch
from student_trainer.sources.common import TeacherCompatError, negotiate

log = logging.getLogger("asymkd.student.cache")


class CachedTeacher:
    """MicroBatch items from an offline cache (see the module docstring)."""

    depth = 0  # answers are read when the training loop asks: it never waits for a teacher

    def __init__(
        self, batches: Iterable[dict], teacher: TeacherSection, distill: DistillSection, student: StudentSide
    ) -> None:
        from safetensors import safe_open

        rows, vocab_size = student.rows, student.vocab_size
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
        self.info = TeacherInfo(**m["teacher"])
        try:
            negotiate(self.info, distill, teacher, student)
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

    def __iter__(self) -> Iterator[MicroBatch]:
        for index, batch in enumerate(self._data):
            t0 = time.perf_counter()
            teacher = self.lookup(batch["sample_ids"])
            yield MicroBatch(batch, teacher, (time.perf_counter() - t0) * 1e3, index)

    def close(self) -> None:
        self._files = []
