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

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The teacher section lives in teacher_config.py; re-exported here with its client options.
from student_trainer.teacher_config import InProcessTeacherSection, TeacherSection, client_options  # noqa: F401
from student_trainer.teacher_config import check_ranges as _check

# Short names accepted for dtypes; stored in their canonical torch spelling.
_DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
# losses.py LOSS_NAMES + design-note aliases (a unit test keeps them equal; --help needs no torch import).
LossName = Literal[
    "forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "skew_kl", "skew_rkl",
    "sampled_reverse_kl",
]  # fmt: skip
# cache/codec.py ENCODINGS (a unit test keeps them equal; --help needs no numpy import).
CacheEncoding = Literal[
    "packed-fp32", "packed-bf16", "packed-fp16", "packed-q8", "packed-q4",
    "delta-fp32", "delta-bf16", "delta-fp16", "delta-q8", "delta-q4",
]  # fmt: skip
_LOSS_ALIASES = {"skew_kl": "skew_forward_kl", "skew_rkl": "skew_reverse_kl"}


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

    signal: Literal["top_k", "full", "hidden", "sampled", "at_ids", "target_only"] = "top_k"
    """what the teacher sends per row. top_k: its k best ids + the exact tail bucket. full: every log-prob.
    hidden: its final hidden state; the student applies the teacher's output layer (fetched once, checked)
    and gets the exact full distribution. sampled: RS-KD, num_samples ids drawn from the teacher (an unbiased
    estimate of forward KL; https://arxiv.org/abs/2503.16870). at_ids: the teacher's log-probs at the
    student's own top_k ids + the tail bucket (a student forward picks them before the teacher is asked:
    no prefetch). target_only: the log-prob of each target token (4 B/token; loss sampled_reverse_kl only)"""
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
    """the divergence; skew_kl = skew_forward_kl, skew_rkl = skew_reverse_kl; sampled_reverse_kl: on-policy
    KD's policy gradient on the target tokens (losses.sampled_reverse_kl_sums; needs signal target_only)"""
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
    lmbda: float = 0.0
    """on-policy KD (GKD, https://arxiv.org/abs/2306.13649): the share of batches whose completions the
    student samples (its own prompts, data.format prompt_completion | messages); the teacher scores them with
    `signal`. The others keep their dataset completion (or the teacher's, seq_kd). docs/onpolicy.md"""
    seq_kd: bool = False
    """sequence-level KD: the batches the student does not sample get completions generated by the teacher
    servers (teacher.targets), not the dataset's"""
    max_new_tokens: int = 64
    """rollouts (student or teacher): tokens generated per prompt at most (EOS ends a completion sooner)"""
    gen_temperature: float = 1.0
    """rollouts: sampling temperature (0 = greedy)"""
    gen_top_p: float = 1.0
    """rollouts: nucleus sampling mass"""
    weight_sync_steps: int = 1
    """student rollouts run on a plain copy of the student in a rollout thread, refreshed from the trained
    (sharded) weights every this many optimizer steps"""
    max_staleness: int = 1
    """student rollouts: a batch trained at step n was sampled by the weights of step n - s, s <= this
    (reported per step). 0 = strictly on-policy (each rollout waits for the step before it); >= 1 lets the
    rollout of the next batch overlap the training step. At least weight_sync_steps - 1"""

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
        if (self.loss == "sampled_reverse_kl") != (self.signal == "target_only"):
            raise ValueError(f"loss={self.loss!r} with signal={self.signal!r}: use signal target_only "
                             "(the teacher's log-prob per target token) with loss sampled_reverse_kl")  # fmt: skip
        if self.signal in ("hidden", "sampled") and self.top_k != DistillSection.top_k:
            raise ValueError(f"top_k={self.top_k} has no effect with signal={self.signal!r}")
        self._check_rollouts()

    def _check_rollouts(self) -> None:
        _check(
            {
                "lmbda": 0 <= self.lmbda <= 1,
                "max_new_tokens": self.max_new_tokens >= 1,
                "gen_temperature": self.gen_temperature >= 0,
                "gen_top_p": 0 < self.gen_top_p <= 1,
                "weight_sync_steps": self.weight_sync_steps >= 1,
                "max_staleness": self.max_staleness >= 0,
            },
            self,
        )
        if self.max_staleness < self.weight_sync_steps - 1:
            raise ValueError(
                f"max_staleness={self.max_staleness} is below weight_sync_steps - 1 "
                f"({self.weight_sync_steps - 1}): weights refreshed every {self.weight_sync_steps} steps are "
                f"up to {self.weight_sync_steps - 1} steps old"
            )

    @property
    def on_policy(self) -> bool:
        """Batches built from prompts by rollouts (student sampling, lmbda > 0, or teacher sampling, seq_kd)."""
        return self.lmbda > 0 or self.seq_kd


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
        if self.distill.on_policy:
            self._check_rollouts()

    def _check_rollouts(self) -> None:
        """On-policy / seq-KD cross-checks: prompt data, a live teacher, completions that fit a row."""
        key = "distill.lmbda" if self.distill.lmbda > 0 else "distill.seq_kd"
        if self.data.format not in ("prompt_completion", "messages"):
            raise ValueError(
                f"{key} needs prompts: data.format={self.data.format!r} is not prompt_completion | messages"
            )
        if self.distill.seq_kd and not self.teacher.targets:
            raise ValueError(
                "distill.seq_kd=true needs teacher.targets (the teacher servers generate the completions)"
            )
        if not (self.teacher.targets or self.teacher.in_process is not None) or self.teacher.cache:
            raise ValueError(
                f"{key} needs a live teacher to score the rollouts (teacher.targets or teacher.in_process, no teacher.cache)"
            )
        if self.distill.max_new_tokens >= self.data.seq_len:
            raise ValueError(
                f"distill.max_new_tokens={self.distill.max_new_tokens} leaves no room for a prompt in data.seq_len={self.data.seq_len}"
            )

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
        if self.distill.on_policy:
            raise ValueError(
                "distill.lmbda / distill.seq_kd: `asymkd cache write` scores the dataset's rows only"
            )
        if self.distill.signal not in ("top_k", "sampled"):
            raise ValueError(
                f"distill.signal={self.distill.signal!r}: a cache holds top_k or sampled answers"
            )
        _check({"shard_rows": self.shard_rows >= 1}, self)
