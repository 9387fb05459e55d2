"""The in-process teacher (`teacher.in_process`): the teacher model runs in the training process, no gRPC.

    source = InProcessTeacher(batches, cfg.teacher, cfg.distill, StudentSide(..., device=dev))
    for mb in source:           # MicroBatch, in data order: scored (teacher forward) right before it is yielded
        step(mb.batch, mb.teacher)
    source.close()

This is the symmetric, sequential way to distill (teacher forward, then student step, on the same devices)
and the baseline that `bench/kd_throughput.py` measures the teacher service against. Everything but the
transport is the service's: the backend is the one `asymkd serve` builds (`build_backend` on the nested
`teacher.in_process` serve section; its device defaults to the student's), it scores the rows a served
teacher would be asked for (every packed row from its first target row, `common.score_from_rows`), the
handshake is `common.negotiate` on the backend's facts (so a request the server would refuse is refused
here at start), and the answer is laid out by `common.scatter_scores`: the loss sees the inputs a served
teacher gives (tested tensor-equal). Prefetch depth is always 0; a MicroBatch's `wait_ms` is the teacher
forward it waited for.

Each rank loads its own copy of the teacher (its memory is in the trainer's process). The backend's async
methods run on a private event loop (`asyncio.Runner`) in the training thread. Every signal: HIDDEN hands
the backend's own output layer (teacher_head.TeacherHead.from_backend) with each batch; AT_IDS yields each
batch with `resolve(ids)` (scored after the student's forward, like the served feed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator

from asymkd.config import ConfigError
from asymkd.contract import OutputLayerInfo, Signal
from student_trainer.config import DistillSection, TeacherSection
from student_trainer.sources.base import MicroBatch, Resolver, StudentSide, TeacherBatch
from student_trainer.sources.common import negotiate, scatter_scores, wanted_signal
from student_trainer.sources.signals import score_items, score_params, scored_rows
from student_trainer.teacher_head import TeacherHead

log = logging.getLogger("asymkd.student.in_process")


class InProcessTeacher:
    """Iterate for MicroBatch items scored by an in-process teacher (see the module docstring)."""

    depth = 0  # nothing is ever scored ahead

    def __init__(
        self, batches: Iterable[dict], teacher: TeacherSection, distill: DistillSection, student: StudentSide
    ) -> None:
        if teacher.in_process is None:
            raise ValueError("teacher.in_process is not set: the in-process teacher needs a serve section")
        from teacher_server.backends import build_backend

        self.cfg = dataclasses.replace(
            teacher.in_process, device=teacher.in_process.device or str(student.device)
        )
        self._data = iter(batches)
        self.distill, self.vocab_size = distill, student.vocab_size
        self._runner = asyncio.Runner()
        self.backend = None
        try:
            self.backend = build_backend(self.cfg)
            self._start_backend()
            self.signal = wanted_signal(distill)
            self.head = None
            if self.signal == Signal.HIDDEN:  # the backend's own layer: nothing to fetch or check
                self.head = TeacherHead.from_backend(self.backend, student.device)
            layer = None if self.head is None else OutputLayerInfo(dtype="float32")
            self.info = dataclasses.replace(self.backend.info, output_layer=layer)
            self.top_k = negotiate(self.info, distill, teacher, student)
        except BaseException:
            self.close()
            raise
        self._read = 0
        log.info(
            "in-process teacher %s (%s, vocab %d, %s) on %s | signal %s top_k %d T %.2f | no prefetch",
            self.info.model, self.info.backend, self.info.vocab_size, self.info.dtype, self.cfg.device,
            distill.signal, distill.top_k, distill.temperature,
        )  # fmt: skip

    def _start_backend(self) -> None:
        try:
            self._runner.run(self.backend.start())
        except (OSError, ValueError, ImportError) as e:  # a missing folder, a bad option: the user's to fix
            raise ConfigError(f"teacher.in_process: could not load {self.cfg.model!r}: {e}") from None

    def score(self, batch: dict, at_ids=None) -> TeacherBatch:
        """One batch through the backend: every packed row from its first target row, laid out as a served
        teacher's answer (AT_IDS: at the student's ids (B, T-1, m))."""
        items = score_items(batch, at_ids)
        scores = self._runner.run(self.backend.score(items, score_params(self.distill, self.top_k)))
        out = scatter_scores(
            scores, batch["loss_mask"], top_k=self.distill.top_k, vocab_size=self.vocab_size, at_ids=at_ids
        )
        out.head = self.head
        return out

    def __iter__(self) -> Iterator[MicroBatch]:
        for batch in self._data:
            index, self._read = self._read, self._read + 1
            if self.signal == Signal.AT_IDS:
                yield self._deferred(batch, index)
                continue
            t0 = time.perf_counter()
            teacher = self.score(batch)
            yield MicroBatch(batch, teacher, (time.perf_counter() - t0) * 1e3, index)

    def _deferred(self, batch: dict, index: int) -> MicroBatch:
        mb = MicroBatch(batch, TeacherBatch(valid=scored_rows(batch["loss_mask"])), 0.0, index)

        def ask(ids) -> TeacherBatch:
            t0 = time.perf_counter()
            out = self.score(batch, ids)
            mb.wait_ms += (time.perf_counter() - t0) * 1e3
            return out

        mb.resolve = Resolver(ask, self.info.vocab_size)
        return mb

    def close(self) -> None:
        """Free the teacher (worker thread, weights) and the event loop; safe to call twice."""
        backend, self.backend = self.backend, None
        try:
            if backend is not None:
                self._runner.run(backend.close())
        finally:
            self._runner.close()
