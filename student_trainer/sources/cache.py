"""The offline teacher cache as a teacher source (`teacher.cache: DIR`), alone or mixed with a live teacher.

    source = CachedTeacher(batches, cfg.teacher, cfg.distill, StudentSide(..., rows=packed_train_rows))
    source = CachedTeacher(batches, ..., live=lambda b: TeacherFeed(b, ...))    # mixed mode (the factory's job)
    for mb in source:           # MicroBatch: each row's answer read from the cache by its sample id
        step(mb.batch, mb.teacher)

Before the first step it checks that the trainer packed the very same rows (rows_sha256; any change of data,
tokenizer or seq_len changes it), the signal, top_k and temperature, and runs the handshake
(`common.negotiate`) on the teacher's facts stored in the manifest (tokenizer hash, vocabulary, padded-vocab
rule). A cache of top-k serves any `distill.top_k` <= k: the k ids are sorted by value and the ones beyond
top_k folded exactly into the tail bucket. Rows are decoded from memory-mapped shards when the training loop
asks for them (`wait_ms` is that time); each rank reads only its own rows. Answers are laid out by
`common.scatter_scores`, as every source's are.

Mixed mode (`teacher.cache` + `teacher.targets` or `teacher.in_process`): the cache may hold only some rows
(an interrupted write, a cache built while training). Each batch's rows found in the cache are read; the
others go, as one smaller batch and in data order, to the live source (with its prefetch, retries and
handshake, which must name the cache's teacher); the two answers are merged row by row. A cache that holds
every row starts no live teacher (a config listing `teacher.targets` trains with none up). `cache_append`
stores the rows scored live: each rank buffers them and writes its own shard files (`shard-a<run>-r<rank>-
<n>.safetensors`, every `shard_rows` rows of the manifest and at close(), also after SIGINT/SIGTERM);
ranks read disjoint rows within an epoch, so no row is written twice by one run, and a row seen again
before its shard is written is served from the buffer. A cache that does not exist yet is created with
the encoding `delta-q4` (the manifest is the same on every rank). A row killed (SIGKILL) before its shard
is written is simply scored again by the next run.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from asymkd.config import ConfigError
from asymkd.contract import SequenceScores, TeacherInfo
from student_trainer.cache import store
from student_trainer.cache.codec import Answers, encode, parse_encoding
from student_trainer.config import CacheWriteConfig, DistillSection, TeacherSection
from student_trainer.sources.base import MicroBatch, StudentSide, TeacherBatch, TeacherSource
from student_trainer.sources.common import TeacherCompatError, negotiate, scatter_scores

log = logging.getLogger("asymkd.student.cache")
LiveFactory = Callable[[Iterable[dict]], TeacherSource]
_LOOKAHEAD = 64  # data batches the live source may read ahead of the training loop (mixed mode)
_SAME_TEACHER = ("model", "vocab_size", "tokenizer_hash")
APPEND_ENCODING = CacheWriteConfig.encoding  # appended rows: the `cache write` defaults


class CachedTeacher:
    """MicroBatch items from an offline cache, the rows it lacks from `live` (see the module docstring)."""

    def __init__(
        self,
        batches: Iterable[dict],
        teacher: TeacherSection,
        distill: DistillSection,
        student: StudentSide,
        *,
        live: LiveFactory | None = None,
    ) -> None:
        self.path, self.teacher, self.distill, self.student = Path(teacher.cache), teacher, distill, student
        self.store: store.CacheStore | None = None
        self._live: TeacherSource | None = None
        self._split: _Split | None = None
        self._append = _Appender(self.path, student.rank) if teacher.cache_append else None
        if self._append is None or (self.path / "manifest.json").exists():
            self.store = self._open(live is not None)
        self._n = len(student.rows)
        if self.store is not None and self.store.rows_cached == self._n:
            live = None  # every row is cached: no teacher needed (nor started)
        try:
            if live is not None:
                self._split = _Split(batches, self._missing)
                self._live = live(self._split.live_batches())
                if self._append is not None and not (self.path / "manifest.json").exists():
                    self._create(self._live.info)
                    self.store = self._open(True)
                self._check_same_teacher(self._live.info)
            else:
                self._data = iter(batches)
        except BaseException:
            self.close()
            raise
        m = self.store.manifest
        log.info("teacher cache %s: %d of %d rows (%s), top_k %d -> %d, teacher %s%s", self.path,
                 self.store.rows_cached, m["rows"], m.get("encoding", "format 1"), m["top_k"], distill.top_k,
                 m["teacher"]["model"], "; the others scored live" if live else "")  # fmt: skip
        if live is None and self._append is not None:
            self._append = None  # nothing will be scored live

    # ------------------------------------------------------------------------------------------- checks
    def _open(self, mixed: bool) -> store.CacheStore:
        rows, distill = self.student.rows, self.distill
        cache = store.CacheStore(self.path)
        m = cache.manifest
        if m["rows_sha256"] != store.rows_sha256(rows):
            raise ConfigError(
                f"teacher.cache: {self.path} was written for other training rows ({m['rows']} rows of "
                f"{m['seq_len']} tokens; the trainer packed {len(rows)} of {rows.tokens.shape[1]}): the data, "
                "tokenizer or data.seq_len differ from the config it was written with"
            )
        if distill.signal != cache.signal or (cache.signal == "top_k" and distill.top_k > m["top_k"]):
            raise ConfigError(
                f"distill.signal={distill.signal!r} top_k={distill.top_k}: the cache holds signal "
                f"{cache.signal!r} top_k={m['top_k']}"
            )
        wanted = store.signal_keys(distill)
        for key in ("num_samples", "sample_seed"):  # SAMPLED: the same draws
            if m.get(key) != wanted.get(key):
                raise ConfigError(f"distill.{key}={wanted.get(key)}: the cache holds {key}={m.get(key)}")
        if self._append is not None and cache.v1:
            raise ConfigError(
                f"teacher.cache_append: {self.path} is a format-1 cache; write a format-2 copy first "
                "(`asymkd cache write --teacher.cache OLD --out NEW`)"
            )
        if self._append is not None and wanted["top_k"] != m["top_k"]:
            raise ConfigError(
                f"teacher.cache_append: distill.top_k={distill.top_k} != the cache's {m['top_k']}"
            )
        if not math.isclose(distill.temperature, m["temperature"]):
            raise ConfigError(
                f"distill.temperature={distill.temperature}: the cache is at T={m['temperature']}"
            )
        self.info = TeacherInfo(**m["teacher"])
        try:
            negotiate(self.info, distill, self.teacher, self.student)
        except TeacherCompatError as e:
            raise ConfigError(f"teacher.cache: {e}") from None
        if not mixed and cache.rows_cached < m["rows"]:
            raise ConfigError(
                f"teacher.cache: {self.path} holds {cache.rows_cached} of {m['rows']} rows (an interrupted "
                "`asymkd cache write`: the same command finishes it); or add a live teacher (teacher.targets "
                "or teacher.in_process) to score the others"
            )
        return cache

    def _check_same_teacher(self, live: TeacherInfo) -> None:
        cached = self.store.manifest["teacher"]
        diff = [
            f"{k} {cached[k]!r} vs {getattr(live, k)!r}"
            for k in _SAME_TEACHER
            if cached[k] != getattr(live, k)
        ]
        if diff:
            raise ConfigError(
                f"teacher.cache: {self.path} was written by another teacher than the live one: {diff}"
            )

    def _create(self, info: TeacherInfo) -> None:
        """cache_append into a folder without a cache: its manifest (identical on every rank) and vocabulary."""
        s, enc = self.student, parse_encoding(APPEND_ENCODING)
        from asymkd.packing import id_bits

        self.path.mkdir(parents=True, exist_ok=True)
        if enc.ids == "delta":
            store.write_vocab(self.path, s.rows.tokens, info.vocab_size)
        store.write_manifest(self.path, {
            "format": store.FORMAT, **store.signal_keys(self.distill), "encoding": enc.name, "rows": len(s.rows),
            "seq_len": int(s.rows.tokens.shape[1]), "rows_sha256": store.rows_sha256(s.rows),
            "tokenizer_hash": s.tokenizer_hash, "teacher": {k: getattr(info, k) for k in store.INFO_KEYS},
            "shard_rows": CacheWriteConfig.shard_rows, "id_bits": id_bits(info.vocab_size), "data": None, "complete": False,
        })  # fmt: skip

    # --------------------------------------------------------------------------------------------- read
    @property
    def depth(self) -> int:
        return self._live.depth if self._live is not None else 0

    def _has(self, row: int) -> bool:
        cached = self.store is not None and self.store.has(row)  # no store yet: a cache being created
        return cached or (self._append is not None and row in self._append.rows)

    def _missing(self, batch: dict) -> torch.Tensor:
        rows = [int(s) % self._n for s in batch["sample_ids"].tolist()]
        return torch.tensor([not self._has(r) for r in rows], dtype=torch.bool)

    def _answers(self, row: int) -> Answers:
        if self._append is not None and row in self._append.rows:
            return self._append.rows[row]
        return self.store.answers(row)

    def lookup(self, batch: dict) -> TeacherBatch:
        """The cached answers of a batch's rows, laid out as every source lays them out."""
        n, k, vocab = self._n, self.distill.top_k, self.student.vocab_size
        scores = []
        for sid in batch["sample_ids"].tolist():
            a = self._answers(int(sid) % n)
            s = _scores(a)
            fold = a.ids.shape[1] > k or bool((s.ids >= vocab).any())
            if s.counts is None and fold:  # TOP_K served below the cache's k: keep the largest, by value
                s.logprobs, order = s.logprobs.sort(dim=1, descending=True, stable=True)
                s.ids = s.ids.gather(1, order)
            scores.append(s)
        try:
            return scatter_scores(scores, batch["loss_mask"], top_k=k, vocab_size=vocab)
        except TeacherCompatError as e:
            raise ConfigError(f"teacher.cache: {e}") from None

    def __iter__(self) -> Iterator[MicroBatch]:
        if self._live is None:
            for index, batch in enumerate(self._data):
                t0 = time.perf_counter()
                teacher = self.lookup(batch)
                yield MicroBatch(batch, teacher, (time.perf_counter() - t0) * 1e3, index)
            return
        live = iter(self._live)
        index = 0
        while (item := self._split.next_main()) is not None:
            t0 = time.perf_counter()
            batch, missing = item
            teacher = self.lookup(_rows(batch, ~missing)) if not bool(missing.all()) else None
            if bool(missing.any()):
                answer = next(live).teacher
                if self._append is not None:
                    self._append.add(_rows(batch, missing)["sample_ids"], answer, self.store)
                teacher = answer if teacher is None else _merge(teacher, answer, missing)
            yield MicroBatch(batch, teacher, (time.perf_counter() - t0) * 1e3, index)
            index += 1

    def close(self) -> None:
        """Stop the live source, write the rows still buffered for the cache; safe to call twice."""
        try:
            if self._split is not None:
                self._split.close()
            if self._live is not None:
                self._live.close()
        finally:
            if self._append is not None and self.store is not None:
                self._append.flush(self.store)
            if self.store is not None:
                self.store.close()


def _scores(a: Answers) -> SequenceScores:
    def tensor(x: np.ndarray | None) -> torch.Tensor | None:
        return None if x is None else torch.from_numpy(x)

    return SequenceScores(
        ids=tensor(a.ids), logprobs=tensor(a.logprobs), tail_logprob=tensor(a.tail),
        target_logprob=tensor(a.target), counts=tensor(a.counts),
    )  # fmt: skip


def _rows(batch: dict, keep: torch.Tensor) -> dict:
    return {name: t[keep] for name, t in batch.items()}


def _merge(cached: TeacherBatch, live: TeacherBatch, from_live: torch.Tensor) -> TeacherBatch:
    """One TeacherBatch: the rows of `live` where from_live, the rows of `cached` elsewhere."""
    out = {}
    for name in ("valid", "ids", "logprobs", "tail_logprob", "target_logprob", "counts"):
        c, v = getattr(cached, name), getattr(live, name)
        if c is None or v is None:
            continue
        t = torch.empty((len(from_live), *c.shape[1:]), dtype=c.dtype)
        t[~from_live], t[from_live] = c, v.to(c.dtype)
        out[name] = t
    return TeacherBatch(**out)


class _Split:
    """One pass over the data batches for two readers: the training loop (every batch, in order) and the live
    source (the rows of each batch the cache lacks, in the same order; it may read ahead _LOOKAHEAD batches)."""

    def __init__(self, batches: Iterable[dict], missing: Callable[[dict], torch.Tensor]) -> None:
        self._data, self._missing = iter(batches), missing
        self._cond = threading.Condition()
        self._main: deque = deque()  # (batch, missing rows), not yet taken by the training loop
        self._live: deque = deque()  # sub-batches not yet taken by the live source
        self._done = self._closed = False

    def _pull(self) -> None:  # holding the lock
        batch = next(self._data, None)
        if batch is None:
            self._done = True
            return
        missing = self._missing(batch)
        self._main.append((batch, missing))
        if bool(missing.any()):
            self._live.append(_rows(batch, missing))

    def next_main(self) -> tuple[dict, torch.Tensor] | None:
        with self._cond:
            if not self._main and not self._done:
                self._pull()
            item = self._main.popleft() if self._main else None
            self._cond.notify_all()
            return item

    def live_batches(self) -> Iterator[dict]:
        while True:
            with self._cond:
                while not self._live and not self._done and not self._closed:
                    if len(self._main) >= _LOOKAHEAD:
                        self._cond.wait(timeout=1.0)
                    else:
                        self._pull()
                if not self._live:
                    return
                item = self._live.popleft()
            yield item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Appender:
    """cache_append: rows scored live, buffered, then written as this rank's own shard files."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path, self.rank = path, rank
        self.rows: dict[int, Answers] = {}
        self._token, self._files, self._lock = uuid.uuid4().hex[:8], 0, threading.Lock()

    def add(self, sample_ids: torch.Tensor, answer: TeacherBatch, cache: store.CacheStore) -> None:
        n = cache.manifest["rows"]
        for i, sid in enumerate(sample_ids.tolist()):
            row = int(sid) % n
            if not cache.has(row):
                self.rows.setdefault(row, store.row_answers(answer, i))
        if len(self.rows) >= cache.manifest.get("shard_rows", CacheWriteConfig.shard_rows):
            self.flush(cache)

    def flush(self, cache: store.CacheStore) -> None:
        """Write the buffered rows as one shard; they leave the buffer once the cache serves them."""
        with self._lock:
            rows = dict(self.rows)
            if not rows:
                return
            m, order = cache.manifest, sorted(rows)
            enc = parse_encoding(m["encoding"])
            arrays = encode(store.concat([rows[r] for r in order]), enc, id_bits=m["id_bits"],
                            rank_of=None if cache.id_order is None else np.argsort(cache.id_order))  # fmt: skip
            arrays["row_index"] = np.array(order, dtype=np.int64)
            name = f"shard-a{self._token}-r{self.rank}-{self._files:04d}.safetensors"
            meta = {
                "format": store.FORMAT,
                "encoding": enc.name,
                "signal": m["signal"],
                "top_k": str(m["top_k"]),
            }
            store.write_shard(self.path, name, arrays, meta)
            self._files += 1
            log.info("teacher cache %s: %d rows scored live appended (%s)", self.path, len(order), name)
            cache.refresh()
            for r in order:
                del self.rows[r]
