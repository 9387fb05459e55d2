"""`asymkd train` configuration: one root dataclass (`TrainConfig`) made of one section per component.

Values come from the defaults below < a YAML file < `--section.key value` flags (asymkd/config.py loads
them); unknown keys are rejected, and the resolved config is written to `<run.out_dir>/config.yaml`.

    asymkd train --config run.yaml --optim.lr 3e-4 --run.steps 200
    asymkd train --help                         # every key with its type, default and the text below it

Each section validates itself in `__post_init__` (messages name the key and the value); `TrainConfig`
cross-checks sections once at start. Components get only the section they need. `CacheWriteConfig` is
`TrainConfig` plus the keys of `asymkd cache write`.
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from teacher_server.config import ServeConfig

# Short names accepted for dtypes; stored in their canonical torch spelling.
_DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
# losses.py LOSS_NAMES + design-note aliases (a unit test keeps them equal; --help needs no torch import).
LossName = Literal[
    "forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "skew_kl", "skew_rkl"
]
# cache/codec.py ENCODINGS (a unit test keeps them equal; --help needs no numpy import).
CacheEncoding = Literal[
    "packed-fp32", "packed-bf16", "packed-fp16", "packed-q8", "packed-q4",
    "delta-fp32", "delta-bf16", "delta-fp16", "delta-q8", "delta-q4",
]  # fmt: skip
_LOSS_ALIASES = {"skew_kl": "skew_forward_kl", "skew_rkl": "skew_reverse_kl"}
# Teacher addresses: host:port, or a gRPC target URI (https://github.com/grpc/grpc/blob/master/doc/naming.md).
_HOST, _V6 = r"(\[[0-9a-fA-F:]+\]|[\w.\-]+)", r"(\[[0-9a-fA-F:]+\]:\d+|[0-9a-fA-F:]+)"
_V4 = r"\d{1,3}(\.\d{1,3}){3}(:\d+)?"
_TARGET = re.compile(
    rf"^({_HOST}:\d+|dns:(//[^/]*/)?{_HOST}(:\d+)?|ipv4:{_V4}(,{_V4})*|ipv6:{_V6}(,{_V6})*|unix:.+)$"
)


def _check(checks: dict[str, bool], section: object) -> None:
    """Raise one ValueError naming every `key=value` whose check failed."""
    bad = [f"{k}={getattr(section, k)!r} is out of range" for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError("; ".join(bad))


def _canonical_dtype(value: str, key: str, allowed: tuple[str, ...]) -> str:
    name = _DTYPE_ALIASES.get(value, value)
    if name not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {sorted(set(allowed) | {'fp32', 'bf16'})}")
    return name


@dataclass
class ModelSection:
    """The student: an HF folder (`path`), or a random-init Llama from the architecture keys below."""

    path: str = ""
    """HF model folder; "" = random init from the keys below"""
    tokenizer: str = ""
    """tokenizer folder; "" = `path`"""
    hidden_size: int = 256
    """random init: the model width"""
    num_layers: int = 4
    """random init: decoder blocks"""
    num_heads: int = 4
    """random init: attention heads"""
    num_kv_heads: int = 0
    """random init: key/value heads (grouped-query attention); 0 = num_heads"""
    intermediate_size: int = 0
    """random init: MLP width; 0 = 4 × hidden_size"""
    vocab_size: int = 0
    """random init: 0 = the tokenizer's; larger pads the vocab (e.g. to the teacher's)"""
    max_position_embeddings: int = 2048
    """random init: the longest sequence"""
    tie_word_embeddings: bool = False
    """random init: the output layer shares the input embedding"""
    dtype: str = "float32"
    """master weights (FSDP mixed precision casts for compute): float32 | bfloat16 (fp32, bf16)"""
    attn_implementation: str = "sdpa"
    """transformers attention implementation (sdpa, eager, ...)"""

    def __post_init__(self) -> None:
        self.dtype = _canonical_dtype(self.dtype, "dtype", ("float32", "bfloat16"))
        _check(
            {
                "hidden_size": self.hidden_size > 0,
                "num_layers": self.num_layers > 0,
                "num_heads": self.num_heads > 0,
                "num_kv_heads": self.num_kv_heads >= 0
                and (self.num_kv_heads == 0 or self.num_heads % self.num_kv_heads == 0),
                "intermediate_size": self.intermediate_size >= 0,
                "vocab_size": self.vocab_size >= 0,
                "max_position_embeddings": self.max_position_embeddings > 1,
            },
            self,
        )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )


@dataclass
class DataSection:
    """Training text: local files (never a hub) or a corpus built by code (`builtin`)."""

    paths: list[str] = field(default_factory=list)
    """files or folders (.txt/.md/.rst, .jsonl/.json, .parquet)"""
    builtin: str = ""
    """"stdlib-docs": docstrings of Python's standard library, made once, cached"""
    format: Literal["auto", "text", "jsonl", "parquet", "messages", "prompt_completion"] = "auto"
    """auto: by file extension (plain documents). text|jsonl|parquet: plain documents from those files.
    messages: records with a chat `messages` list; prompt_completion: `prompt` + `completion` strings.
    Both mask the prompt: only the completion (the last assistant turn) is a training target."""
    text_field: str = "text"
    """jsonl/parquet column holding plain documents"""
    text_sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """what one document is in .txt"""
    seq_len: int = 512
    """tokens per packed row; a row gives seq_len - 1 targets"""
    eval_fraction: float = 0.0
    """held-out share of the documents (split before packing)"""
    eval_path: list[str] = field(default_factory=list)
    """or held-out files"""
    max_documents: int = 0
    """train on the first N training documents only (after the held-out split: the held-out set is the
    same whatever N); 0 = all. A small fixed corpus seen for several epochs: the data-limited regime"""
    shuffle: bool = True
    """shuffle packed rows per epoch (seeded by run.seed)"""
    cache: bool = True
    """keep tokenized packs under $ASYMKD_CACHE/packs (keyed by files, tokenizer, seq_len)"""

    def __post_init__(self) -> None:
        if self.paths and self.builtin:
            raise ValueError(f"set paths={self.paths!r} or builtin={self.builtin!r}, not both")
        if self.builtin and self.builtin not in BUILTIN_CORPORA:
            raise ValueError(f"builtin={self.builtin!r} is not one of {list(BUILTIN_CORPORA)}")
        if self.eval_fraction > 0 and self.eval_path:
            raise ValueError(f"set eval_fraction={self.eval_fraction} or eval_path, not both")
        _check(
            {
                "seq_len": self.seq_len >= 2,
                "eval_fraction": 0.0 <= self.eval_fraction < 1.0,
                "max_documents": self.max_documents >= 0,
            },
            self,
        )


BUILTIN_CORPORA = ("stdlib-docs",)


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine (or constant) decay; gradient accumulation and clipping."""

    lr: float = 3e-4
    """peak learning rate"""
    weight_decay: float = 0.1
    """on matrices only (norms and biases are not decayed)"""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)"""
    eps: float = 1e-8
    """AdamW epsilon"""
    warmup_steps: int = 0
    """linear warmup from 0 to lr"""
    schedule: Literal["cosine", "constant"] = "cosine"
    """the decay after warmup"""
    min_lr_ratio: float = 0.1
    """cosine ends at lr × min_lr_ratio"""
    grad_clip: float = 1.0
    """max global grad norm; 0 = off"""
    micro_batch_size: int = 8
    """rows per rank per micro-batch"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""

    def __post_init__(self) -> None:
        _check(
            {
                "lr": self.lr > 0,
                "weight_decay": self.weight_decay >= 0,
                "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                "eps": self.eps > 0,
                "warmup_steps": self.warmup_steps >= 0,
                "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
                "grad_clip": self.grad_clip >= 0,
                "micro_batch_size": self.micro_batch_size >= 1,
                "grad_accum_steps": self.grad_accum_steps >= 1,
            },
            self,
        )


@dataclass
class ParallelSection:
    """FSDP2 over all ranks of the torchrun job (dp_replicate > 1 gives HSDP)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available"""
    param_dtype: str = "auto"
    """compute dtype; auto = float32 on CPU, bfloat16 on CUDA"""
    reduce_dtype: str = "float32"
    """gradient reduce-scatter dtype; bf16 halves the traffic"""
    activation_checkpointing: bool = False
    """recompute each decoder block in backward"""
    reshard_after_forward: bool = True
    """False keeps gathered params until backward (more memory, less comm)"""
    dp_shard: int = -1
    """ranks a parameter is sharded over; -1 = WORLD_SIZE / dp_replicate"""
    dp_replicate: int = 1
    """replicas of the sharded group (HSDP)"""
    timeout_s: float = 600.0
    """collective timeout: a rank that died or hangs fails the others after at most this long"""

    def __post_init__(self) -> None:
        dtypes = ("float32", "bfloat16")
        if self.param_dtype != "auto":
            self.param_dtype = _canonical_dtype(self.param_dtype, "param_dtype", dtypes)
        self.reduce_dtype = _canonical_dtype(self.reduce_dtype, "reduce_dtype", dtypes)
        _check(
            {
                "dp_shard": self.dp_shard == -1 or self.dp_shard >= 1,
                "dp_replicate": self.dp_replicate >= 1,
                "timeout_s": self.timeout_s > 0,
            },
            self,
        )


@dataclass
class DistillSection:
    """The KD objective: loss = kd_weight · KD + ce_weight · CE, each a mean over target tokens."""

    signal: Literal["top_k", "full", "hidden", "sampled", "at_ids"] = "top_k"
    """what the teacher sends per row. top_k: its k best ids + the exact tail bucket. full: every log-prob.
    hidden: its final hidden state; the student applies the teacher's output layer (fetched once, checked)
    and gets the exact full distribution. sampled: RS-KD, num_samples ids drawn from the teacher (an unbiased
    estimate of forward KL; https://arxiv.org/abs/2503.16870). at_ids: the teacher's log-probs at the
    student's own top_k ids + the tail bucket (a student forward picks them before the teacher is asked:
    no prefetch)"""
    top_k: int = 64
    """top_k signal: teacher ids per row (the rest is one tail bucket); at_ids: the student's ids per row"""
    num_samples: int = 12
    """sampled signal: draws per row (with replacement) from softmax(teacher logits / T)"""
    sample_seed: int = 1
    """sampled signal: the draws are a function of (this seed, the row), so a resent batch gets the same
    ones; 0 = the server picks a seed per request"""
    value_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the teacher's values on the wire (log-probs, hidden states); the losses run in float32"""
    pack_ids: bool = True
    """ids travel packed to ceil(log2 V) bits (when the teacher offers it; else int32)"""
    temperature: float = 1.0
    """applied by the teacher server; the student divides its logits by it"""
    loss: LossName = "forward_kl"
    """the divergence; skew_kl = skew_forward_kl, skew_rkl = skew_reverse_kl"""
    beta: float = 0.5
    """generalized JSD: 0 = forward KL, 1 = reverse KL"""
    alpha: float = 0.1
    """skew KL mixing"""
    kd_weight: float = 1.0
    """weight of the KD term"""
    ce_weight: float = 0.0
    """CE on the true next token (T = 1); without teacher targets the loss is CE only"""
    chunk_rows: int = 256
    """full / hidden signals: rows per block of the fused dense loss (each block's vocabulary-sized
    intermediates, the teacher's logits included, live only inside it); 0 = all rows at once"""

    def __post_init__(self) -> None:
        if self.loss not in typing.get_args(LossName):
            raise ValueError(f"loss={self.loss!r} is not one of {list(typing.get_args(LossName))}")
        self.loss = _LOSS_ALIASES.get(self.loss, self.loss)
        _check(
            {
                "top_k": self.top_k >= 1,
                "temperature": self.temperature > 0,
                "beta": 0 <= self.beta <= 1,
                "alpha": 0 <= self.alpha <= 1,
                "kd_weight": self.kd_weight >= 0,
                "ce_weight": self.ce_weight >= 0,
                "chunk_rows": self.chunk_rows >= 0,
                "num_samples": self.num_samples >= 1,
                "sample_seed": self.sample_seed >= 0,
            },
            self,
        )
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight=0 and ce_weight=0: the loss would be 0")
        forward = self.loss == "forward_kl" or (self.loss == "jsd" and self.beta == 0)
        if self.signal == "sampled" and not forward:
            raise ValueError(
                f"signal='sampled' estimates forward KL only (RS-KD), not loss={self.loss!r}"
                + (f" with beta={self.beta}" if self.loss == "jsd" else "")
                + ": use forward_kl (or jsd with beta=0), or signal top_k / at_ids / full / hidden"
            )
        if self.signal in ("hidden", "sampled") and self.top_k != DistillSection.top_k:
            raise ValueError(f"top_k={self.top_k} has no effect with signal={self.signal!r}")


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
        _check(
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


@dataclass
class CheckpointSection:
    """DCP checkpoints (model, optimizer, scheduler, data position, RNG, step) and the final HF export."""

    dir: str = ""
    """"" = <run.out_dir>/checkpoints"""
    every_steps: int = 0
    """0 = only at the end of the run"""
    keep: int = 2
    """newest checkpoints kept"""
    resume: bool | str = False
    """true = the newest checkpoint in `dir` (none: start fresh); or a step folder"""
    export: bool = True
    """save_pretrained + tokenizer to <run.out_dir>/final at the end"""
    stop_grace_s: float = 25.0
    """SIGINT/SIGTERM: every rank stops after its current step and a checkpoint is written, if that takes
    at most this long (then the run stops without one); under the 30 s that torchrun, SLURM and Kubernetes
    give by default before SIGKILL"""

    def __post_init__(self) -> None:
        if not isinstance(self.resume, bool | str):
            raise ValueError(f"resume={self.resume!r} must be true/false or a checkpoint folder")
        _check(
            {
                "every_steps": self.every_steps >= 0,
                "keep": self.keep >= 1,
                "stop_grace_s": self.stop_grace_s > 0,
            },
            self,
        )


@dataclass
class MetricsSection:
    """Progress lines (rank 0) and per-step records."""

    log_every: int = 1
    """steps between progress lines (rank 0)"""
    jsonl: str = "metrics.jsonl"
    """one record per step (sample ids included), under run.out_dir; "" = off"""
    tensorboard: bool = False
    """also write TensorBoard events (if the package is installed)"""

    def __post_init__(self) -> None:
        _check({"log_every": self.log_every >= 1}, self)


@dataclass
class RunSection:
    """The run: where it writes, how long it trains, its seed and evaluations."""

    out_dir: str = "runs/student"
    """config.yaml, metrics, checkpoints and the export go here"""
    steps: int = 100
    """optimizer steps"""
    max_seconds: float = 0.0
    """also stop once the training loop has run this long (every rank after the same step; evaluation,
    checkpoint and export follow as at run.steps); 0 = no time limit"""
    seed: int = 0
    """model init, data order"""
    eval_every: int = 0
    """steps between held-out evaluations; 0 = only at the end (when there is eval data)"""
    eval_batches: int = 4
    """micro-batches per rank per evaluation"""
    overwrite: bool = False
    """train into an out_dir that already holds a run's files (checkpoints, metrics, final/) after removing
    them; without it such an out_dir is refused unless checkpoint.resume is set"""

    def __post_init__(self) -> None:
        _check(
            {
                "steps": self.steps >= 1,
                "max_seconds": self.max_seconds >= 0,
                "eval_every": self.eval_every >= 0,
                "eval_batches": self.eval_batches >= 1,
            },
            self,
        )


@dataclass
class TrainConfig:
    """Train a student against a teacher (servers, in process, or a cache); CE only without one."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    distill: DistillSection = field(default_factory=DistillSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        if not self.model.path and not self.model.tokenizer:
            raise ValueError("set model.path (an HF folder) or model.tokenizer (for a random-init student)")
        if not self.data.paths and not self.data.builtin:
            raise ValueError(
                f"set data.paths (files or folders) or data.builtin (one of {list(BUILTIN_CORPORA)})"
            )
        if self.run.eval_every > 0 and not self.has_eval:
            raise ValueError(
                f"run.eval_every={self.run.eval_every} needs held-out data: set data.eval_fraction or data.eval_path"
            )
        if self.data.seq_len > self.model.max_position_embeddings and not self.model.path:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}"
            )
        if self.distill.signal == "full" and self.distill.top_k != DistillSection.top_k:
            raise ValueError(f"distill.top_k={self.distill.top_k} has no effect with distill.signal='full'")

    @property
    def has_eval(self) -> bool:
        return self.data.eval_fraction > 0 or bool(self.data.eval_path)

    @property
    def uses_teacher(self) -> bool:
        return bool(self.teacher.targets or self.teacher.in_process is not None or self.teacher.cache)


@dataclass
class CacheWriteConfig(TrainConfig):
    """`asymkd cache write`: score every packed training row of this config once, through its teacher
    (teacher.targets, teacher.in_process, or teacher.cache alone: re-encode that cache)."""

    out: str = ""
    """the cache folder to write (required); an interrupted write in it is resumed"""
    encoding: CacheEncoding = "delta-q4"
    """ids-values: ids packed (ceil(log2 V) bits) or delta (sorted, exp-Golomb gaps); values fp32 (lossless),
    bf16, fp16, q8 or q4 (codes over each row's log-prob range); the tail mass is exact in all. Top-64 of a
    49k vocab: delta-q4 ~98 B/token, delta-q8 ~130, delta-fp32 ~324 (format 1: ~525)"""
    shard_rows: int = 1024
    """rows per safetensors shard (a resumed write redoes at most one shard per rank)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.out:
            raise ValueError(f"out={self.out!r}: --out DIR is required (the folder the cache is written to)")
        if not self.uses_teacher:
            raise ValueError(
                "teacher.targets, teacher.in_process or teacher.cache: `asymkd cache write` needs a teacher "
                "to score the rows"
            )
        if self.teacher.cache and Path(self.teacher.cache).resolve() == Path(self.out).resolve():
            raise ValueError(f"out={self.out!r} is teacher.cache: write the new cache to another folder")
        if self.teacher.cache_append:
            raise ValueError("teacher.cache_append has no effect in `asymkd cache write`")
        if self.distill.signal not in ("top_k", "sampled"):
            raise ValueError(
                f"distill.signal={self.distill.signal!r}: a cache holds top_k or sampled answers"
            )
        _check({"shard_rows": self.shard_rows >= 1}, self)
