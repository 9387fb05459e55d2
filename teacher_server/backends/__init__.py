"""Teacher backends: `hf` (transformers, the embedded default) and `vllm` (tensor-parallel serving)."""

from __future__ import annotations

from teacher_server.backends.base import TeacherBackend


def build_backend(cfg) -> TeacherBackend:
    """Instantiate the backend named by `cfg.backend` (a ServeConfig)."""
    if cfg.backend == "hf":
        from teacher_server.backends.hf import HFBackend

        return HFBackend(cfg)
    if cfg.backend == "vllm":
        from teacher_server.backends.vllm import VLLMBackend

        return VLLMBackend(cfg)
    raise ValueError(f"backend: unknown backend {cfg.backend!r} (expected 'hf' or 'vllm')")
