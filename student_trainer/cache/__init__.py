"""Offline teacher cache: score the training rows once, then train any number of students (and epochs) from
disk, with no teacher running, or with a live teacher for the rows it lacks (mixed mode).

    asymkd cache write --config train.yaml --out DIR [--encoding delta-q4]   # teacher.targets / in_process
    python -m asymkd.torchrun --standalone --nproc_per_node=2 -m asymkd.cli cache write --config ... --out DIR
    asymkd cache info DIR [--json]                                  # what a cache holds
    asymkd train --config train.yaml --teacher.cache DIR             # train from it: no teacher at train time

    manifest = write_cache(cfg)          # the library entry point (CacheWriteConfig -> the manifest)

| module | what |
|---|---|
| codec.py | encodings (`packed`/`delta` ids × `fp32`/`bf16`/`fp16`/`q8`/`q4` values): the table of sizes and of what is exact |
| store.py | the folder: manifest, shard files (safetensors, memory-mapped), reading rows (formats 2 and 1), `cache info` |
| writer.py | `asymkd cache write`: several ranks, progress, resumable |

The trainer side is `student_trainer/sources/cache.py` (`CachedTeacher`): before the first step it checks that
it packed the very same rows (rows_sha256: any change of data, tokenizer or seq_len changes it), the signal,
top_k and temperature, and runs the teacher handshake on the teacher's facts in the manifest. Format 1 caches
(`asymkd-teacher-cache/1`: int32 ids + fp32 values, one dense row per packed row) still read.
"""

from __future__ import annotations

from student_trainer.cache.codec import ENCODINGS, Answers, Encoding, parse_encoding
from student_trainer.cache.store import (
    FORMAT,
    FORMAT_V1,
    CacheStore,
    describe,
    read_manifest,
    rows_sha256,
    summarize,
)
from student_trainer.cache.writer import WriteInterrupted, write_cache

__all__ = [
    "ENCODINGS", "FORMAT", "FORMAT_V1", "Answers", "CacheStore", "Encoding", "WriteInterrupted", "describe", "parse_encoding",
    "read_manifest", "rows_sha256", "summarize", "write_cache",
]  # fmt: skip
