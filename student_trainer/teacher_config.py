"""`asymkd train` teacher keys: where the teacher runs (`TeacherSection`, the `teacher:` section of
student_trainer/config.py, which re-exports everything here) and the gRPC client options it implies.

    from student_trainer.config import TeacherSection, client_options
    AsyncTeacherClient(teacher.targets, **client_options(teacher))
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from teacher_server.config import ServeConfig


def check_ranges(checks: dict[str, bool], section: object) -> None:
    """Raise one ValueError naming every `key=value` whose check failed."""
    bad = [f"{k}={getattr(section, k)!r} is out of range" for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError("; ".join(bad))


# Teacher addresses: host:port, or a gRPC target URI (https://github.com/grpc/grpc/blob/master/doc/naming.md).
_HOST, _V6 = r"(\[[0-9a-fA-F:]+\]|[\w.\-]+)", r"(\[[0-9a-fA-F:]+\]:\d+|[0-9a-fA-F:]+)"
_V4 = r"\d{1,3}(\.\d{1,3}){3}(:\d+)?"
_TARGET = re.compile(
    rf"^({_HOST}:\d+|dns:(//[^/]*/)?{_HOST}(:\d+)?|ipv4:{_V4}(,{_V4})*|ipv6:{_V6}(,{_V6})*|unix:.+)$"
)


@dataclass
class InProcessTeacherSection(ServeConfig):
    """The in-process teacher: the keys of `asymkd serve` (its backend, dtype, limits), run in the trainer."""

    model: str = ""
    """an HF folder, a .gguf file or "default" (the embedded SmolLM2-135M-Instruct); required"""
    device: str = ""
    """"" = the student's device"""


@dataclass
class TeacherSection:
    """Where the teacher runs: servers (targets), in this process (in_process) or a cache; none = CE-only.

    `targets` are balanced with failover; `in_process` has no gRPC (each micro-batch is scored then trained
    on, one after the other); `cache` reads the teacher's answers from disk. `cache` with `targets` or
    `in_process` is mixed mode: rows the cache holds are read, the others are scored live.
    """

    targets: list[str] = field(default_factory=list)
    """teacher replicas: "host:port" or gRPC target URIs (dns:///name:port, ipv4:a:p,b:p, unix:/path)"""
    in_process: InProcessTeacherSection | str | None = None
    """in-process teacher (sources/in_process.py; no prefetch: the student waits for every teacher forward):
    `{model: PATH, dtype: bfloat16, ...}` (`asymkd serve` keys, `--teacher.in_process.help`; device defaults
    to the student's), or the model alone (an HF folder, a .gguf file or "default")"""
    cache: str = ""
    """offline cache (student_trainer/cache/, written by `asymkd cache write`): teacher answers read from disk,
    no teacher. With targets or in_process (mixed mode) the rows it lacks are scored by that live teacher"""
    cache_append: bool = False
    """mixed mode: store the rows scored live in the cache too (each rank writes its own shard files, every
    `shard_rows` rows and at the end of the run; creates the cache when the folder holds none)"""
    prefetch: int = 4
    """batches in flight to the teacher ahead of the one being trained on"""
    timeout_s: float = 60.0
    """deadline per request"""
    max_retries: int = 5
    """per request, on UNAVAILABLE / RESOURCE_EXHAUSTED, with backoff (client level)"""
    retry_deadline_s: float = 300.0
    """feed level: resend held batches until no answer came for this long"""
    connect_timeout_s: float = 120.0
    """how long the trainer waits at start for a teacher that is not up yet; then a clear error, exit 2"""
    data_plane: Literal["grpc", "torch"] = "grpc"
    """where full / hidden rows travel: grpc (in the messages, chunked) or torch (a torch.distributed pair
    group per rank with its teacher: gloo on CPU, NCCL on GPU; the request and status stay on gRPC). With
    torch, each rank talks to one replica (targets[rank % n])"""
    allow_padded_vocab: bool = False
    """accept a teacher vocab smaller than the student's (e.g. 151936 vs 152064): the extra student ids are
    ids the tokenizer never produces; they count as teacher probability 0 (top-k: in the tail bucket)"""
    tls_ca: str = ""
    """TLS to the teacher: the CA (PEM) that signed the servers' certificates (`asymkd serve --tls-cert`)"""
    tls_cert: str = ""
    """mutual TLS: this client's certificate (PEM), for servers started with --tls-client-ca; needs tls_key"""
    tls_key: str = ""
    """mutual TLS: the private key of tls_cert (PEM)"""
    tls_server_name: str = ""
    """the name the servers' certificates carry, when it is not the host in targets (an IP, several targets)"""
    auth_token_file: str = ""
    """a file holding the bearer token of servers started with --auth-token-file"""
    auth_token_env: str = ""
    """or the name of an environment variable holding it (e.g. ASYMKD_TEACHER_TOKEN)"""

    def __post_init__(self) -> None:
        self._check_security()
        bad = [t for t in self.targets if not _TARGET.match(t)]
        if bad:
            raise ValueError(f"targets {bad} are not host:port or a gRPC URI (dns:, ipv4:, ipv6:, unix:)")
        if isinstance(self.in_process, str):  # the shorthand `in_process: MODEL`
            if self.in_process.lstrip().startswith("{"):  # a section jsonargparse could not read as one
                raise ValueError(f"in_process={self.in_process!r} is neither a model nor `asymkd serve` keys")
            self.in_process = InProcessTeacherSection(model=self.in_process)
        if self.in_process is not None and not self.in_process.model:
            raise ValueError("in_process.model is empty (in_process.KEY flags replace `in_process: MODEL`)")
        if self.targets and self.in_process is not None:
            raise ValueError(
                f"set one live teacher (targets or in_process), got targets={self.targets!r}, "
                f"in_process={self.in_process.model!r} (with cache, either one scores the rows it lacks)"
            )
        if self.cache_append and not (self.cache and (self.targets or self.in_process is not None)):
            raise ValueError("cache_append=true needs cache and a live teacher (targets or in_process)")
        if self.data_plane == "torch" and not self.targets:
            raise ValueError("data_plane='torch' needs teacher servers (targets): it joins their data plane")
        check_ranges(
            {
                "prefetch": self.prefetch >= 1,
                "timeout_s": self.timeout_s > 0,
                "max_retries": self.max_retries >= 0,
            },
            self,
        )

    def _check_security(self) -> None:
        """One line naming the key: cert and key together, files that exist, one token source that is set."""
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(f"{given} needs {missing} (this client's certificate and its key go together)")
        if self.tls_server_name and not (self.tls_ca or self.tls_cert):
            raise ValueError(f"tls_server_name={self.tls_server_name!r} needs TLS: set tls_ca")
        for key in _SECURITY_FILES:
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise ValueError(f"{key}={path!r}: no such file")
        if self.auth_token_file and self.auth_token_env:
            raise ValueError("set auth_token_file or auth_token_env, not both")
        if self.auth_token_env and not os.environ.get(self.auth_token_env, "").strip():
            raise ValueError(
                f"auth_token_env={self.auth_token_env!r}: the environment variable is unset or empty"
            )


_SECURITY_FILES = ("tls_ca", "tls_cert", "tls_key", "auth_token_file")
_SECURITY_KEYS = (*_SECURITY_FILES, "tls_server_name", "auth_token_env")


def client_options(teacher: TeacherSection) -> dict[str, object]:
    """The keyword options of AsyncTeacherClient / TeacherClient for `teacher.targets`: deadline, retries,
    and the TLS / token options that are set (`AsyncTeacherClient(teacher.targets, **client_options(t))`)."""
    options: dict[str, object] = {"timeout_s": teacher.timeout_s, "max_retries": teacher.max_retries}
    return options | {key: getattr(teacher, key) for key in _SECURITY_KEYS if getattr(teacher, key)}
