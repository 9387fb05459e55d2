"""`asymkd cache write`: every packed training row scored once through a teacher source, stored in shards.

    asymkd cache write --config train.yaml --out DIR [--encoding delta-q4]                 # one process
    python -m asymkd.torchrun --standalone --nproc_per_node=2 -m asymkd.cli cache write --config train.yaml --out DIR

The training split is packed exactly as `asymkd train` packs it. Its rows are cut into shards of
`shard_rows` (shard s holds rows [s·shard_rows, (s+1)·shard_rows)); rank r writes shards r, r + W, ...
Each rank scores its rows in order, `optim.micro_batch_size` rows per request, through the config's teacher
source (`build_teacher_source`: `teacher.targets` with prefetch, retries and failover over its replicas,
`teacher.in_process`, or `teacher.cache` alone to re-encode a cache), and writes a shard when its last row
is answered. Rank 0 writes `manifest.json` twice: the plan before the first row (settings, teacher, data;
`complete: false`) and the totals once every shard exists.

Resuming: SIGINT/SIGTERM stops each rank after its current request (a second signal at once); the shard
in progress is dropped, shards written are whole (temporary file + rename). The same command again keeps
every shard of the same plan (same rows, teacher, encoding, k, temperature, shard_rows) and scores the
others, with any number of ranks: nothing is lost or written twice. A folder with another plan, or a
complete cache, is written anew. Progress: one line every `_PROGRESS_S` on rank 0 (rows, tokens/s, ETA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from asymkd.config import ConfigError
from asymkd.packing import id_bits
from student_trainer.cache import store
from student_trainer.cache.codec import encode, frequency_order, parse_encoding
from student_trainer.config import CacheWriteConfig
from student_trainer.interrupt import DUPLICATE_WINDOW_S

log = logging.getLogger("asymkd.student.cache")
_PROGRESS_S = 10.0
_POLL_S = 0.5


class WriteInterrupted(Exception):
    """The write stopped on a signal; the shards written are kept (`signum`, `shards_done`, `shards`)."""

    def __init__(self, signum: int, done: int, total: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: {done} of {total} shards written; the same command continues")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def write_cache(cfg: CacheWriteConfig) -> dict:
    """Score every packed training row of `cfg` once and store the answers in `cfg.out` (see the module
    docstring). Returns the manifest. Raises ConfigError (a bad config or folder), WriteInterrupted."""
    import torch.distributed as dist

    from student_trainer.parallel import destroy_distributed, init_distributed

    joined = not dist.is_initialized()
    ranks = init_distributed(cfg.parallel.device, cfg.parallel.timeout_s)
    try:
        return _Writer(cfg, ranks.rank, ranks.world_size, ranks.device).run()
    finally:
        if joined:
            destroy_distributed()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def plan_keys(m: dict) -> dict:
    """What a resumed write must share with the folder's manifest."""
    keys = (
        "format",
        "signal",
        "encoding",
        "top_k",
        "num_samples",
        "sample_seed",
        "temperature",
        "rows",
        "seq_len",
    )
    keys += ("rows_sha256",)
    teacher = {k: m.get("teacher", {}).get(k) for k in ("model", "vocab_size", "tokenizer_hash")}
    return {k: m.get(k) for k in (*keys, "tokenizer_hash", "shard_rows")} | {"teacher": teacher}


class _Writer:
    def __init__(self, cfg: CacheWriteConfig, rank: int, world: int, device: torch.device) -> None:
        from asymkd.contract import tokenizer_hash
        from student_trainer.data import load_packs, tokenizer_id
        from student_trainer.model import load_tokenizer

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.enc = parse_encoding(cfg.encoding)
        self.out = Path(cfg.out)
        tokenizer, tok_dir = load_tokenizer(cfg.model)
        try:
            self.rows = load_packs(cfg.data, tokenizer, tokenizer_id(tok_dir), rank=rank)["train"]
        except (FileNotFoundError, KeyError) as e:
            raise ConfigError(f"data: {e}") from None
        self.tok_hash, self.vocab = tokenizer_hash(tok_dir), _student_vocab(cfg, len(tokenizer))
        self.n, self.seq_len = len(self.rows), int(self.rows.tokens.shape[1])
        self.shards = -(-self.n // cfg.shard_rows)
        self.todo: list[int] = []
        self._ready, self._stop, self._closing = threading.Event(), 0, False

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        import torch.distributed as dist

        from student_trainer.sources import build_teacher_source
        from student_trainer.sources.base import StudentSide
        from student_trainer.sources.common import TeacherCompatError, TeacherUnreachableError

        student = StudentSide(self.vocab, self.tok_hash, self.seq_len, self.rank, self.device, self.rows)
        teacher = dataclasses.replace(self.cfg.teacher, cache_append=False)
        try:
            source = build_teacher_source(teacher, self.cfg.distill, self._batches(), student)
        except (TeacherCompatError, TeacherUnreachableError) as e:
            raise ConfigError(f"teacher: {e}") from None
        t0 = time.perf_counter()
        try:
            with self._signals():
                plan = self._plan(source.info)
                if self.rank == 0:
                    self._prepare(plan)
                dist.barrier()
                self.todo = [s for s in range(self.rank, self.shards, self.world) if not self._done(s)]
                self._ready.set()
                self._score(source, plan)
        finally:
            self._closing = True
            self._ready.set()
            source.close()
        if self.rank != 0:
            return plan
        return self._finish(plan, time.perf_counter() - t0)

    def _plan(self, info) -> dict:
        teacher = {k: getattr(info, k) for k in store.INFO_KEYS}
        data = self.cfg.data
        return {
            "format": store.FORMAT, **store.signal_keys(self.cfg.distill), "encoding": self.enc.name, "rows": self.n,
            "seq_len": self.seq_len, "rows_sha256": store.rows_sha256(self.rows), "tokenizer_hash": self.tok_hash,
            "teacher": teacher, "shard_rows": self.cfg.shard_rows, "id_bits": id_bits(info.vocab_size),
            "data": {"paths": list(data.paths), "builtin": data.builtin, "format": data.format,
                     "seq_len": data.seq_len, "eval_fraction": data.eval_fraction},
            "complete": False,
        }  # fmt: skip

    def _prepare(self, plan: dict) -> None:
        """Rank 0, before any row: keep the shards of an interrupted write with this plan; else start anew."""
        self.out.mkdir(parents=True, exist_ok=True)
        for tmp in self.out.glob(".*.tmp-*"):  # a write killed while renaming
            tmp.unlink()
        old = None
        with contextlib.suppress(ConfigError):
            old = store.read_manifest(self.out)
        keep = old is not None and not old.get("complete") and plan_keys(old) == plan_keys(plan)
        names = {shard_name(s) for s in range(self.shards)}
        for f in store.shard_files(self.out):
            if not keep or f.name not in names:
                f.unlink()
        if keep:
            log.info("resuming the write in %s: %d of %d shards are there", self.out,
                     sum(self._done(s) for s in range(self.shards)), self.shards)  # fmt: skip
        elif old is not None:
            diff = [k for k, v in plan_keys(plan).items() if plan_keys(old).get(k) != v]
            why = "it was complete" if not diff else f"other {', '.join(diff)}"
            log.info("writing %s anew (%s)", self.out, why)
        (self.out / "vocab.safetensors").unlink(missing_ok=True)
        if self.enc.ids == "delta":
            store.write_vocab(self.out, self.rows.tokens, plan["teacher"]["vocab_size"])
        store.write_manifest(self.out, plan)

    def _rank_of(self, plan: dict) -> np.ndarray:
        return frequency_order(self.rows.tokens, plan["teacher"]["vocab_size"])

    def _done(self, s: int) -> bool:
        return (self.out / shard_name(s)).exists()

    def rows_written(self) -> int:
        """Rows in the shard files there now, whichever rank wrote them."""
        spans = [self._span(s) for s in range(self.shards) if self._done(s)]
        return sum(b - a for a, b in spans)

    def _span(self, s: int) -> tuple[int, int]:
        return s * self.cfg.shard_rows, min((s + 1) * self.cfg.shard_rows, self.n)

    def _batches(self) -> Iterator[dict]:
        """This rank's rows of the shards to write, in order, micro_batch_size at a time (none crosses a shard)."""
        self._ready.wait()
        mbs = self.cfg.optim.micro_batch_size
        for s in list(self.todo):
            a, b = self._span(s)
            for i in range(a, b, mbs):
                if self._stop or self._closing:
                    return
                idx = np.arange(i, min(i + mbs, b))
                yield {
                    "input_ids": torch.from_numpy(self.rows.tokens[idx].astype(np.int64)),
                    "loss_mask": torch.from_numpy(self.rows.mask[idx]),
                    "sample_ids": torch.from_numpy(idx),
                }

    # -------------------------------------------------------------------------------------------- score
    def _score(self, source, plan: dict) -> None:
        rank_of = self._rank_of(plan) if self.enc.ids == "delta" else None
        todo_rows = sum(b - a for a, b in map(self._span, self.todo))
        progress = _Progress(self, todo_rows)
        queue, buffer, ids = list(self.todo), [], []
        for mb in source:
            ids += mb.batch["sample_ids"].tolist()
            buffer += [store.row_answers(mb.teacher, i) for i in range(len(mb.batch["sample_ids"]))]
            progress.add(len(mb.batch["sample_ids"]), int(mb.teacher.valid.sum()))
            a, b = self._span(queue[0])
            if len(buffer) == b - a:
                if ids != list(range(a, b)):  # the sources' contract: every batch once, in order
                    raise RuntimeError(
                        f"shard {queue[0]}: the source answered rows {ids[:8]}..., not {a}..{b - 1}"
                    )
                arrays = encode(store.concat(buffer), self.enc, id_bits=plan["id_bits"], rank_of=rank_of)
                arrays["row_index"] = np.arange(a, b, dtype=np.int64)
                meta = {"format": store.FORMAT, "encoding": self.enc.name, "signal": plan["signal"]}
                store.write_shard(
                    self.out, shard_name(queue.pop(0)), arrays, meta | {"top_k": str(plan["top_k"])}
                )
                buffer, ids = [], []
            if self._stop:
                raise WriteInterrupted(self._stop, sum(map(self._done, range(self.shards))), self.shards)
            progress.maybe_log(len(buffer))
        if queue:
            raise RuntimeError(f"the teacher source ended with shards {queue} unwritten")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM: stop after the current request; a second one (after the
        DUPLICATE_WINDOW_S in which torchrun forwards the same Ctrl-C again): exit at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        first_at = [0.0]

        def handle(signum: int, frame) -> None:
            now = time.monotonic()
            if self._stop and now - first_at[0] > DUPLICATE_WINDOW_S:  # not torchrun forwarding the same one
                name = signal.Signals(signum).name
                print(f"[cache r{self.rank}] {name} again: stopping at once", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            if self._stop:
                return
            self._stop, first_at[0] = signum, now
            log.warning(
                "%s: stopping after this request (shards written are kept)", signal.Signals(signum).name
            )

        previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _finish(self, plan: dict, seconds: float) -> dict:
        """Rank 0: wait for every rank's shards, then the manifest with the totals."""
        waited = False
        while not all(map(self._done, range(self.shards))):
            if not waited:
                log.info("waiting for the other ranks' shards")
                waited = True
            time.sleep(_POLL_S)
        shards = []
        for s in range(self.shards):
            shard = store.Shard(self.out / shard_name(s))
            shards.append({"file": shard.file.name, "rows": len(shard.rows), "tokens": int(shard.pos[-1]),
                           "bytes": shard.file.stat().st_size})  # fmt: skip
        tokens = sum(s["tokens"] for s in shards)
        disk, data = store.disk_bytes(self.out)
        source = "cache" if not (self.cfg.teacher.targets or self.cfg.teacher.in_process) else (
            "targets" if self.cfg.teacher.targets else "in_process")  # fmt: skip
        manifest = plan | {
            "complete": True, "rows_cached": self.n, "tokens": tokens, "bytes_on_disk": disk,
            "bytes_per_token": round(data / max(tokens, 1), 2), "shards": shards,
            "writer": {"source": source, "world_size": self.world, "seconds": round(seconds, 2)},
        }  # fmt: skip
        store.write_manifest(self.out, manifest)
        log.info("cache %s: %d rows, %d tokens, %.1f B/token (%s), %.0f s", self.out, self.n, tokens,
                 manifest["bytes_per_token"], self.enc.name, seconds)  # fmt: skip
        return manifest


def _student_vocab(cfg: CacheWriteConfig, tokenizer_len: int) -> int:
    """The logits width `asymkd train` would build with this config (its teacher handshake is the writer's)."""
    if cfg.model.path:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(Path(cfg.model.path).expanduser()).get_text_config().vocab_size)
    return cfg.model.vocab_size or tokenizer_len


class _Progress:
    """One line every _PROGRESS_S on rank 0: rows (all ranks), tokens/s, ETA."""

    def __init__(self, writer: _Writer, todo_rows: int) -> None:
        self.w, self.todo_rows = writer, todo_rows
        self.rows = self.tokens = 0
        self.t0 = self.last = time.perf_counter()

    def add(self, rows: int, tokens: int) -> None:
        self.rows, self.tokens = self.rows + rows, self.tokens + tokens

    def maybe_log(self, buffered: int) -> None:
        now = time.perf_counter()
        if self.w.rank != 0 or now - self.last < _PROGRESS_S:
            return
        from student_trainer.observability import format_duration

        w, self.last, elapsed = self.w, now, now - self.t0
        done = w.rows_written() + buffered  # every rank's shards + this rank's shard in progress
        eta = (self.todo_rows - self.rows) * elapsed / self.rows if self.rows else 0.0
        tok_s = self.tokens / elapsed * w.world  # the ranks score alike
        log.info("cache write %3.0f%% | rows %d/%d | %s tok/s | eta %s", 100 * done / w.n, done, w.n,
                 f"{tok_s:,.0f}", format_duration(eta))  # fmt: skip
