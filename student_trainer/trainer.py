"""The student training loop: FSDP2 model, teacher source, KD + CE loss, AdamW, checkpoints, eval, export.

    torchrun --standalone --nproc_per_node=2 -m asymkd.cli train --config run.yaml
    python -c "from student_trainer.trainer import Trainer; Trainer(cfg).train()"   # one rank

One optimizer step = `grad_accum_steps` micro-batches per rank. Loss normalization: every micro-batch's loss
is a *sum* over its target rows (loss_mask & teacher.valid); before any backward the step's target count is
summed over the micro-batches and all-reduced over ranks (N), and each micro-batch back-propagates
sum × dp_size / N. FSDP averages gradients over the dp ranks (÷ dp_size), so the accumulated gradient is
Σ_ranks Σ_micro ∇sum / N: exactly the gradient of the mean loss over all target tokens of the global batch,
however tokens are spread over micro-batches and ranks.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymkd.config import ConfigError, dump_config
from asymkd.contract import tokenizer_hash
from student_trainer import losses
from student_trainer.checkpoint import Checkpointer, export_pretrained
from student_trainer.config import DistillSection, OptimSection, TrainConfig
from student_trainer.data import PackedDataset, load_packs, tokenizer_id
from student_trainer.model import build_student, load_tokenizer
from student_trainer.observability import MetricsLogger, memory_gb, setup_logging
from student_trainer.parallel import (
    ParallelDims,
    all_gather_1d,
    all_reduce_sum,
    apply_ac,
    apply_fsdp,
    clip_grad_norm,
    init_distributed,
    mp_policy,
)
from student_trainer.sources import build_teacher_source
from student_trainer.sources.base import MicroBatch, StudentSide, TeacherBatch, TeacherSource
from student_trainer.sources.common import TeacherCompatError

log = logging.getLogger("asymkd.student")


# ------------------------------------------------------------------------------------ optimizer, schedule
def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float
) -> float:
    """LR factor for optimizer step `step` (0-based): linear warmup, then cosine down to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim: OptimSection, total_steps: int) -> tuple[Any, Any]:
    """AdamW (weight decay on matrices only) and its LambdaLR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(
            s,
            warmup_steps=optim.warmup_steps,
            total_steps=total_steps,
            schedule=optim.schedule,
            min_lr_ratio=optim.min_lr_ratio,
        ),
    )
    return optimizer, sched


# ------------------------------------------------------------------------------------------------- loss
def target_mask(batch: dict[str, Tensor], teacher: TeacherBatch | None) -> Tensor:
    """(B, T-1) bool: rows that are training targets (and were scored by the teacher, if any)."""
    mask = batch["loss_mask"]
    return mask if teacher is None else mask & teacher.valid.to(mask.device)


def _pad_row(t: Tensor | None, value: float = 0) -> Tensor | None:
    """(B, T-1, ...) → (B, T, ...): one dummy (masked) row so rows line up with the (B·T, V) logits view."""
    if t is None:
        return None
    pad = [0, 0] * (t.dim() - 2) + [0, 1]
    return F.pad(t, pad, value=value)


class LossSums(NamedTuple):
    """Sums over the target rows of one micro-batch; the KD fields are None without a teacher."""

    loss: Tensor  # what is back-propagated (before normalization)
    kd: Tensor | None
    ce: Tensor
    teacher_mass: Tensor | None = None  # Σ teacher probability inside the sent support (1 − tail for TOP_K)
    student_mass: Tensor | None = None  # Σ student probability on the teacher's top-k ids


def loss_sums(
    logits: Tensor, input_ids: Tensor, mask: Tensor, teacher: TeacherBatch | None, distill: DistillSection
) -> LossSums:
    """Loss sums over target rows; logits (B, T, V), mask (B, T-1), teacher rows aligned with mask.

    Without a teacher the loss is CE. With one: kd_weight · KD + ce_weight · CE (losses.py: TOP_K through
    the fused kernel, FULL in chunks of `chunk_rows` valid rows, so no (B, T, V) tensor is built beyond the
    student's own logits).
    """
    b, t, v = logits.shape
    flat = logits.reshape(b * t, v)  # a view: row b·T + t predicts input_ids[b, t + 1]
    mask_p = _pad_row(mask, False)
    targets = _pad_row(input_ids[:, 1:])
    if teacher is None:
        ce = losses.ce_loss_sum(flat, targets, mask_p)
        return LossSums(ce, None, ce)
    if teacher.ids is not None:
        t_lp, t_ids, t_tail = teacher.logprobs, teacher.ids, teacher.tail_logprob
    else:
        t_lp, t_ids, t_tail = teacher.full, None, None
    out = losses.distill_loss(
        flat,
        _pad_row(t_lp),
        mask_p,
        teacher_ids=_pad_row(t_ids),
        teacher_tail=_pad_row(t_tail),
        targets=targets,
        chunk_rows=distill.chunk_rows or None,
        loss=distill.loss,
        beta=distill.beta,
        alpha=distill.alpha,
        temperature=distill.temperature,
    )
    loss = distill.kd_weight * out.kd_sum + distill.ce_weight * out.ce_sum
    n = out.num_tokens  # the losses report the two masses as means over valid rows
    return LossSums(
        loss, out.kd_sum, out.ce_sum, out.teacher_mass_in_support * n, out.student_mass_in_teacher_topk * n
    )


def forward_backward_step(
    model: nn.Module, mb: MicroBatch, *, distill: DistillSection, scale: float, device: torch.device
) -> Tensor:
    """Forward one micro-batch, backward `loss_sum × scale`; returns the detached `LossSums` as a (5,) fp64
    tensor (NaN for the KD fields without a teacher)."""
    input_ids = mb.batch["input_ids"].to(device)
    teacher = None if mb.teacher is None else mb.teacher.to(device)
    mask = target_mask(mb.batch, mb.teacher).to(device)
    logits = model(input_ids=input_ids).logits
    sums = loss_sums(logits, input_ids, mask, teacher, distill)
    (sums.loss * scale).backward()
    nan = torch.full_like(sums.loss, float("nan"))
    return torch.stack([nan if x is None else x.float() for x in sums]).detach().double().cpu()


def accumulate_gradients(
    model: nn.Module,
    micro: list[MicroBatch],
    *,
    distill: DistillSection,
    device: torch.device,
    dp_size: int = 1,
) -> tuple[Tensor, float]:
    """Backward every micro-batch so the gradients equal ∇ of the global token mean (see module docstring).

    Returns the local `LossSums` fields as a (5,) tensor (not yet reduced over ranks) and the global target
    count N.
    """
    local = sum(int(target_mask(mb.batch, mb.teacher).sum()) for mb in micro)
    n_tokens = float(all_reduce_sum(torch.tensor([local], dtype=torch.float64)).item())
    scale = dp_size / max(n_tokens, 1.0)  # × dp_size undoes FSDP's gradient averaging over the dp ranks
    sums = torch.zeros(len(LossSums._fields), dtype=torch.float64)
    for mb in micro:
        sums += forward_backward_step(model, mb, distill=distill, scale=scale, device=device)
    return sums, n_tokens


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds everything from a `TrainConfig` at start (fail fast), then `train()` runs the loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dist = init_distributed(cfg.parallel.device)
        self.rank, self.device = self.dist.rank, self.dist.device
        setup_logging(self.rank)
        try:
            self.dims = ParallelDims(cfg.parallel.dp_replicate, cfg.parallel.dp_shard, self.dist.world_size)
        except ValueError as e:
            raise ConfigError(f"parallel: {e}") from None
        self.out_dir = Path(cfg.run.out_dir)
        if self.rank == 0:
            dump_config(cfg, self.out_dir / "config.yaml")
        self.tokenizer, self.tokenizer_dir = load_tokenizer(cfg.model)
        self.train_data, self.eval_data = self._build_data()  # a missing data file fails before the model
        self.model = self._build_model()
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.run.steps)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.out_dir, self.rank)
        self.metrics = MetricsLogger(cfg.metrics, self.out_dir, rank=self.rank, total_steps=cfg.run.steps)
        self.last_stats: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.step = 0  # optimizer steps done
        self.data_position = 0  # micro-batches consumed (per rank; the same index on every rank)
        log.info(
            "world %d (dp_replicate %d × dp_shard %d) on %s | %d train rows of %d tokens",
            self.dist.world_size,
            self.dims.dp_replicate,
            self.dims.dp_shard,
            self.device,
            len(self.train_data),
            cfg.data.seq_len,
        )

    def _build_model(self) -> nn.Module:
        par = self.cfg.parallel
        model = build_student(
            self.cfg.model,
            tokenizer_len=len(self.tokenizer),
            seed=self.cfg.run.seed,
            tokenizer=self.tokenizer,
        )
        if par.activation_checkpointing:
            apply_ac(model)
        model.to(self.device)
        mesh = self.dims.build_mesh(self.device.type)
        policy = mp_policy(par.param_dtype, par.reduce_dtype, self.device.type)
        return apply_fsdp(model, mesh, policy, reshard_after_forward=par.reshard_after_forward)

    def _build_data(self) -> tuple[PackedDataset, PackedDataset | None]:
        cfg = self.cfg
        try:
            packs = load_packs(cfg.data, self.tokenizer, tokenizer_id(self.tokenizer_dir), rank=self.rank)
        except (FileNotFoundError, KeyError) as e:
            raise ConfigError(f"data: {e}") from None
        common = {"micro_batch_size": cfg.optim.micro_batch_size, "rank": self.rank}
        common["world_size"] = self.dims.dp_size
        train = PackedDataset(packs["train"], seed=cfg.run.seed, shuffle=cfg.data.shuffle, **common)
        held = PackedDataset(packs["eval"], shuffle=False, **common) if "eval" in packs else None
        return train, held

    def _open_source(self) -> TeacherSource:
        """The teacher source the config names, over the batches this run has left; its handshake (GetInfo,
        the in-process teacher's load, the cache's checks) happens here, before the first step."""
        remaining = (self.cfg.run.steps - self.step) * self.cfg.optim.grad_accum_steps
        batches = itertools.islice(self.train_data.batches(start=self.data_position), remaining)
        student = StudentSide(
            vocab_size=self.model.get_output_embeddings().weight.shape[0],
            tokenizer_hash=tokenizer_hash(self.tokenizer_dir),
            seq_len=self.cfg.data.seq_len,
            rank=self.rank,
            device=self.device,
            rows=self.train_data.rows,
        )
        try:
            return build_teacher_source(self.cfg.teacher, self.cfg.distill, batches, student)
        except TeacherCompatError as e:
            raise ConfigError(f"teacher: {e}") from None

    def train(self) -> dict[str, Any]:
        cfg, accum = self.cfg, self.cfg.optim.grad_accum_steps
        self._maybe_resume()
        source = self._open_source()
        self.metrics.start(self.step)
        stream = iter(source)
        last_saved = self.step
        try:
            while self.step < cfg.run.steps:
                t0 = time.perf_counter()
                micro = list(itertools.islice(stream, accum))
                if len(micro) < accum:
                    raise RuntimeError(
                        f"the data feed ended early at step {self.step} ({len(micro)} micro-batches)"
                    )
                stats = self.last_stats = self.train_step(micro)
                self.step += 1
                self.data_position += accum
                self.metrics.log_step(
                    self.step, self._step_record(stats, micro, source, time.perf_counter() - t0)
                )
                if cfg.run.eval_every and self.step % cfg.run.eval_every == 0:
                    self._run_eval()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save()
                    last_saved = self.step
        finally:
            source.close()
        summary = {"step": self.step, "loss": self.last_stats.get("loss")}
        if self.eval_data is not None:
            summary |= self.last_eval if self.last_eval.get("step") == self.step else self._run_eval()
        if last_saved != self.step:
            self.save()
        if cfg.checkpoint.export:
            export_pretrained(self.model, self.tokenizer, self.out_dir / "final", rank=self.rank)
        self._write_summary(summary)
        return summary

    def train_step(self, micro: list[MicroBatch]) -> dict[str, Any]:
        """Accumulate gradients over the micro-batches, clip, step AdamW and the LR schedule."""
        sums, n_tokens = accumulate_gradients(
            self.model, micro, distill=self.cfg.distill, device=self.device, dp_size=self.dims.dp_size
        )
        gnorm = clip_grad_norm(self.model, self.cfg.optim.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        means = (all_reduce_sum(sums) / max(n_tokens, 1.0)).tolist()
        stats = {k: None if math.isnan(v) else v for k, v in zip(LossSums._fields, means, strict=True)}
        return stats | {"lr": lr, "gnorm": gnorm, "tokens": int(n_tokens)}

    def _step_record(
        self, stats: dict, micro: list[MicroBatch], source: TeacherSource, dt: float
    ) -> dict[str, Any]:
        ids = all_gather_1d(torch.cat([mb.batch["sample_ids"] for mb in micro]))
        n_input = sum(mb.batch["input_ids"].numel() for mb in micro) * self.dims.dp_size
        record = {
            **stats,
            "tok_per_s": n_input / max(dt, 1e-9),
            "step_time_s": dt,
            "mem_gb": memory_gb(self.device),
        }
        if self.cfg.uses_teacher:
            record |= {"teacher_wait_ms": sum(mb.wait_ms for mb in micro), "prefetch": source.depth}
        return record | {"data_position": self.data_position, "sample_ids": ids.tolist()}

    def _run_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.metrics.log_eval(self.step, metrics)
        self.last_eval = {"step": self.step, **metrics}
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out CE against the true next tokens, mean over target tokens of all ranks."""
        assert self.eval_data is not None
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for i in range(self.cfg.run.eval_batches):
            batch = self.eval_data.batch(i)
            input_ids, mask = batch["input_ids"].to(self.device), batch["loss_mask"].to(self.device)
            logits = self.model(input_ids=input_ids).logits
            ce = loss_sums(logits, input_ids, mask, None, self.cfg.distill).ce
            sums += torch.tensor([ce.item(), mask.sum().item()], dtype=torch.float64)
        self.model.train()
        ce, n = all_reduce_sum(sums).tolist()
        loss = ce / max(n, 1.0)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(n)}

    def save(self) -> None:
        state = {"step": self.step, "data_position": self.data_position, "world_size": self.dist.world_size}
        state["scheduler"] = self.scheduler.state_dict()
        self.checkpointer.save(self.step, self.model, self.optimizer, state)

    def _maybe_resume(self) -> None:
        path = self.checkpointer.resume_path()
        if path is None:
            return
        state = self.checkpointer.load(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.data_position = state["step"], state["data_position"]
        # Steps after this one may already be in metrics.jsonl (a run that went on past the checkpoint):
        # readers take the records after the last "resume" record for those steps.
        self.metrics.log_event("resume", self.step, {"path": str(path), "data_position": self.data_position})
        if state.get("world_size") != self.dist.world_size:
            log.warning(
                "resuming a %s-rank checkpoint on %d ranks: the data order continues from micro-batch %d "
                "but rows are dealt differently",
                state.get("world_size"),
                self.dist.world_size,
                self.data_position,
            )

    def _write_summary(self, summary: dict[str, Any]) -> None:
        if self.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def close(self) -> None:
        self.metrics.close()
