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

A new source (on-policy rollouts, a tensor data plane) implements `TeacherSource` and gets a line in
`build_teacher_source`. Every source runs the same handshake on its teacher's facts (`common.negotiate`:
tokenizer, vocabulary, signal, sequence length) before the first step, and lays its answers out with
`common.scatter_scores`, so the loss sees the same tensors whichever source produced them.
"""

from __future__ import annotations

from collections.abc import Iterable

from student_trainer.config import DistillSection, TeacherSection
from student_trainer.sources.base import NoTeacher, StudentSide, TeacherSource


def build_teacher_source(
    teacher: TeacherSection, distill: DistillSection, batches: Iterable[dict], student: StudentSide
) -> TeacherSource:
    """The source the config names (at most one of cache, in_process, targets; none = CE only). Raises
    common.TeacherCompatError when the teacher does not fit the student (checked here, before step 1)."""
    if teacher.cache:
        from student_trainer.sources.cache import CachedTeacher

        return CachedTeacher(batches, teacher, distill, student)
    if teacher.in_process is not None:
        from student_trainer.sources.in_process import InProcessTeacher

        return InProcessTeacher(batches, teacher, distill, student)
    if teacher.targets:
        from student_trainer.sources.live import TeacherFeed

        return TeacherFeed(batches, teacher, distill, student)
    return NoTeacher(batches)
