"""Integration fixtures: real teacher servers on free loopback ports."""

from __future__ import annotations

import pytest

from teacher_server.launch import LocalTeacher


@pytest.fixture(scope="module")
def hf_teacher(tiny_teacher_dir, tmp_path_factory):
    """A real `teacher_server.server` process (hf backend, fp32, CPU) serving the tiny teacher."""
    log = tmp_path_factory.mktemp("logs") / "teacher.log"
    with LocalTeacher(
        ["--model", str(tiny_teacher_dir), "--backend", "hf", "--max-top-k", "512"], log_path=log
    ) as t:
        yield t
