"""The in-process teacher (`teacher.in_process`): the teacher model runs in the training process, no gRPC.

    feed = InProcessTeacherFeed(batches, cfg.teacher, cfg.distill, device=dev, vocab_size=V, tokenizer_hash=h)
    for fed in feed:            # FedBatch, in data order: scored (teacher forward) right before it is yielded
        step(fed.batch, fed.teacher)
    feed.close()

This is the symmetric, sequential way to distill (teacher forward, then student step, on the same devices)
and the baseline that `bench/kd_throughput.py` measures the teacher service against. Everything but the
transport is the service's: the backend is the one `asymkd serve` builds (`build_backend` on a ServeConfig
parsed from `teacher.in_process_args` like `asymkd serve` flags; its device defaults to the student's), each
batch becomes the same ScoreRequest TeacherFeed sends (`build_query`), validated by the server's own
`parse_score_request`, and the backend's answer is laid out by the same `scatter_scores`, so the loss sees
the inputs a served teacher gives. The vocabulary handshake is TeacherFeed's (`negotiate`) on the backend's
facts. Prefetch depth is always 0; a FedBatch's `wait_ms` is the teacher forward it waited for.

Each rank loads its own copy of the teacher (its memory is in the trainer's process). The backend's async
methods run on a private event loop (`asyncio.Runner`) in the training thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator

import torch

from asymkd.configs import ConfigError
from student_trainer.config import DistillSection, TeacherSection
from student_trainer.teacher_feed import FedBatch, TeacherBatch, build_query, negotiate, scatter_scores
from teacher_server.backends.base import SeqScores
from teacher_server.client import SequenceScores
from teacher_server.config import ServeConfig

log = logging.getLogger("asymkd.student.in_process")


def in_process_serve_config(teacher: TeacherSection, device: torch.device | str = "cpu") -> ServeConfig:
    """`asymkd serve` flags -> ServeConfig: --device <student's>, then teacher.in_process_args, then --model."""
    import yaml

    from teacher_server.server import parse_config

    args = ["--device", str(device), *teacher.in_process_args, "--model", teacher.in_process]
    try:
        return parse_config(args)
    except (ConfigError, OSError, yaml.YAMLError) as e:
        raise ConfigError(f"teacher.in_process_args: {e}") from None


def as_client_scores(s: SeqScores) -> SequenceScores:
    """A backend's SeqScores as the client hands them over: same tensors, ids widened to int64."""
    out = SequenceScores(**s.tensors())
    if out.ids is not None:
        out.ids = out.ids.long()
    return out


class InProcessTeacherFeed:
    """Iterate for FedBatch items scored by an in-process teacher (see the module docstring). The same
    interface as TeacherFeed: `depth`, `info`, `top_k`, `close()`, a context manager."""

    depth = 0  # nothing is ever scored ahead

    def __init__(
        self,
        batches: Iterable[dict],
        teacher: TeacherSection,
        distill: DistillSection,
        *,
        vocab_size: int,
        tokenizer_hash: str,
        device: torch.device | str = "cpu",
    ) -> None:
        if not teacher.in_process:
            raise ValueError("teacher.in_process is empty: the in-process feed needs a teacher model")
        from teacher_server.backends import build_backend
        from teacher_server.validation import Limits

        self.cfg = in_process_serve_config(teacher, device)
        self._data = iter(batches)
        self.distill, self.vocab_size = distill, vocab_size
        self._runner = asyncio.Runner()
        self.backend = None
        try:
            self.backend = build_backend(self.cfg)
            self._start_backend()
            self.info = self.backend.info
            self.limits = Limits.from_info(self.info, self.cfg.max_request_tokens)
            self.top_k = negotiate(
                self.info, distill, teacher, vocab_size=vocab_size, tokenizer_hash=tokenizer_hash
            )
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

    def score(self, batch: dict) -> TeacherBatch:
        """One batch through the server's request path, minus the transport: ScoreRequest -> validation ->
        backend.score -> rows laid out as TeacherFeed lays them out."""
        from teacher_server.validation import parse_score_request

        request = build_query(batch, self.distill, self.top_k).to_proto(f"batch-{self._read}")
        items, params = parse_score_request(request, self.limits)
        results = self._runner.run(self.backend.score(items, params))
        scores = [as_client_scores(s) for s in results]
        top_k, vocab = self.distill.top_k, self.vocab_size
        return scatter_scores(scores, batch["loss_mask"], top_k=top_k, vocab_size=vocab)

    def __iter__(self) -> Iterator[FedBatch]:
        for batch in self._data:
            t0 = time.perf_counter()
            teacher = self.score(batch)
            wait_ms = (time.perf_counter() - t0) * 1e3
            index, self._read = self._read, self._read + 1
            yield FedBatch(batch, teacher, wait_ms, index)

    def close(self) -> None:
        """Free the teacher (worker thread, weights) and the event loop; safe to call twice."""
        backend, self.backend = self.backend, None
        try:
            if backend is not None:
                self._runner.run(backend.close())
        finally:
            self._runner.close()

    def __enter__(self) -> InProcessTeacherFeed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
