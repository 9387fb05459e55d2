"""Teacher sources: where the trainer's micro-batches get their teacher answers. One interface, four sources.

    source = build_teacher_source(cfg.teacher, cfg.distill, batches, student)
    try:
        for mb in source:           # MicroBatch, in data order, exactly one per data batch
            step(mb.batch, mb.teacher)          # teacher rows aligned with logits[:, :-1]; mask with .valid
    finally:
        source.close()

| source | config | module | what it does |
|---|---|---|---|
| `NoTeacher` | no teacher key | here | CE-only: the batches themselves |
| `TeacherFeed` | `teacher.targets` | live.py | teacher servers over gRPC, `teacher.prefetch` batches in flight, exactly once |
| `InProcessTeacher` | `teacher.in_process` | in_process.py | the backend in this process: score, then train |
| `CachedTeacher` | `teacher.cache` | cache.py | answers written by `asymkd cache write`, read from disk |
| `CachedTeacher` + a live source | `teacher.cache` + `targets` or `in_process` | cache.py | mixed: rows the cache lacks are scored live |

A new source implements `TeacherSource` and gets a line in `build_teacher_source`. On-policy rollouts are
not a source: they produce the batches (student_trainer/onpolicy.py) that any source then scores. Every source runs the same handshake on its teacher's facts (`common.negotiate`:
tokenizer, vocabulary, signal, sequence length) before the first step, and lays its answers out with
`common.scatter_scores`, so the loss sees the same tensors whichever source produced them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from student_trainer.config import DistillSection, TeacherSection
from student_trainer.sources.base import NoTeacher, StudentSide, TeacherSource


def build_teacher_source(
    teacher: TeacherSection, distill: DistillSection, batches: Iterable[dict], student: StudentSide
) -> TeacherSource:
    """The source the config names: a live teacher (in_process or targets), a cache, a cache with a live
    teacher for the rows it lacks (mixed), or none (CE only). Raises common.TeacherCompatError when the
    teacher does not fit the student (checked here, before step 1)."""
    live = _live_source(teacher, distill, student)
    if teacher.cache:
        from student_trainer.sources.cache import CachedTeacher

        return CachedTeacher(batches, teacher, distill, student, live=live)
    return live(batches) if live is not None else NoTeacher(batches)


def _live_source(
    teacher: TeacherSection, distill: DistillSection, student: StudentSide
) -> Callable[[Iterable[dict]], TeacherSource] | None:
    """batches -> the live source of the config (in_process or targets), or None."""
    if teacher.in_process is not None:
        from student_trainer.sources.in_process import InProcessTeacher

        return lambda batches: InProcessTeacher(batches, teacher, distill, student)
    if teacher.targets:
        from student_trainer.sources.live import TeacherFeed

        return lambda batches: TeacherFeed(batches, teacher, distill, student)
    return None
