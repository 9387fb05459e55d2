"""The student training loop: FSDP2 model, teacher source, the step (step.py), checkpoints, eval, export.

    torchrun --standalone --nproc_per_node=2 -m asymkd.cli train --config run.yaml
    python -c "from student_trainer.trainer import Trainer; Trainer(cfg).train()"   # one rank

Order at start (fail fast): process group and parallel degrees, the out_dir and the checkpoint to resume
from, tokenizer, data, model, optimizer; the teacher source's handshake right before the first step. A
SIGINT/SIGTERM stops every rank after its step with a checkpoint (interrupt.py).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asymkd.config import ConfigError, dump_config
from asymkd.contract import tokenizer_hash
from student_trainer.checkpoint import Checkpointer, check_out_dir, export_pretrained
from student_trainer.config import TrainConfig
from student_trainer.data import PackedDataset, load_packs, load_prompt_documents, tokenizer_id
from student_trainer.interrupt import Interrupted, StopRequest
from student_trainer.model import build_student, load_tokenizer
from student_trainer.observability import MetricsLogger, memory_gb, setup_logging
from student_trainer.onpolicy import Rollouts, sample_lines, step_samples
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
from student_trainer.rollout import PromptDataset
from student_trainer.sources import build_teacher_source
from student_trainer.sources.base import MicroBatch, StudentSide, TeacherSource
from student_trainer.sources.common import TeacherCompatError, TeacherUnreachableError
from student_trainer.step import LossSums, accumulate_gradients, build_optimizer, loss_sums

log = logging.getLogger("asymkd.student")


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds everything from a `TrainConfig` at start (fail fast), then `train()` runs the loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dist = init_distributed(cfg.parallel.device, cfg.parallel.timeout_s)
        self.rank, self.device = self.dist.rank, self.dist.device
        setup_logging(self.rank)
        try:
            self.dims = ParallelDims(cfg.parallel.dp_replicate, cfg.parallel.dp_shard, self.dist.world_size)
        except ValueError as e:
            raise ConfigError(f"parallel: {e}") from None
        self.out_dir = Path(cfg.run.out_dir)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.out_dir, self.rank)
        self.resume_from = self._resume_point()
        check_out_dir(cfg.run, self.checkpointer, resume=self.resume_from, rank=self.rank)
        if self.rank == 0:
            dump_config(cfg, self.out_dir / "config.yaml")
        self.tokenizer, self.tokenizer_dir = load_tokenizer(cfg.model)
        self.train_data, self.eval_data = self._build_data()  # a missing data file fails before the model
        self.rollout_model: nn.Module | None = None  # on-policy: the plain copy the student samples with
        self.model = self._build_model()
        self.rollouts = self._build_rollouts() if cfg.distill.on_policy else None
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.run.steps)
        self.metrics = MetricsLogger(
            cfg.metrics,
            self.out_dir,
            rank=self.rank,
            total_steps=cfg.run.steps,
            max_seconds=cfg.run.max_seconds,
        )
        self.last_stats: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.totals = {"samples": 0, "teacher_wait_s": 0.0}  # this process's steps, for the summary
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

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from (None: start fresh), checked against run.steps before anything is built."""
        path = self.checkpointer.resume_path()
        if path is None:
            if self.cfg.checkpoint.resume not in (False, "", "false"):
                log.info("checkpoint.resume: no checkpoint in %s: starting fresh", self.checkpointer.dir)
            return None
        step = Checkpointer.step_of(path)
        if step > self.cfg.run.steps:
            raise ConfigError(
                f"run.steps={self.cfg.run.steps} is below the step of the checkpoint to resume from ({step}, "
                f"{path}): raise run.steps, or resume from an earlier checkpoint"
            )
        return path

    def _build_model(self) -> nn.Module:
        par = self.cfg.parallel
        model = build_student(
            self.cfg.model,
            tokenizer_len=len(self.tokenizer),
            seed=self.cfg.run.seed,
            tokenizer=self.tokenizer,
        )
        if self.cfg.distill.lmbda > 0:
            self.rollout_model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
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

    def _build_rollouts(self) -> Rollouts:
        """On-policy / seq-KD: the prompts of this rank and the rollout thread (onpolicy.py)."""
        cfg, tok = self.cfg, self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.resume_from is None:  # a fresh run (check_out_dir passed): no samples of an earlier one
            (self.out_dir / f"samples-r{self.rank}.jsonl").unlink(missing_ok=True)
        prompts = PromptDataset(
            load_prompt_documents(cfg.data, tok, rank=self.rank),
            micro_batch_size=cfg.optim.micro_batch_size,
            seq_len=cfg.data.seq_len,
            max_new_tokens=cfg.distill.max_new_tokens,
            eos_id=tok.eos_token_id,
            rank=self.rank,
            world_size=self.dims.dp_size,
            seed=cfg.run.seed,
            shuffle=cfg.data.shuffle,
        )
        return Rollouts(
            cfg.distill,
            cfg.teacher,
            prompts,
            self.rollout_model,
            seed=cfg.run.seed,
            rank=self.rank,
            grad_accum_steps=cfg.optim.grad_accum_steps,
            eos_id=tok.eos_token_id,
            pad_id=pad,
            vocab_limit=len(tok),
        )

    def _open_source(self) -> TeacherSource:
        """The teacher source the config names, over the batches this run has left; its handshake (GetInfo,
        the in-process teacher's load, the cache's checks) happens here, before the first step."""
        remaining = (self.cfg.run.steps - self.step) * self.cfg.optim.grad_accum_steps
        if self.rollouts is not None:
            self.rollouts.publish(self.step, self.model, start=True)
            batches = self.rollouts.start(self.data_position, remaining)
        else:
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
        except (TeacherCompatError, TeacherUnreachableError) as e:
            raise ConfigError(f"teacher: {e}") from None

    def train(self) -> dict[str, Any]:
        """Run the remaining steps; on SIGINT/SIGTERM every rank stops after its step, a checkpoint is written
        and Interrupted is raised (student_trainer/interrupt.py)."""
        cfg = self.cfg
        self._maybe_resume()
        stop = StopRequest(cfg.checkpoint.stop_grace_s)
        with stop.installed():
            source = None
            try:
                source = self._open_source()
                last_saved = self._loop(source, stop)
            finally:
                if self.rollouts is not None:  # first: the source's reader may be waiting on a rollout
                    self.rollouts.close()
                if source is not None:
                    source.close()
            if self.last_stats.get("stop"):  # on every rank, whichever got the signal
                if last_saved != self.step:
                    self.save()
                signum = stop.signum or signal.SIGTERM
                self._say_how_to_resume(signum)
                raise Interrupted(signum, self.step)
        return self._finish(last_saved)

    def _loop(self, source: TeacherSource, stop: StopRequest) -> int:
        """Optimizer steps until run.steps or an agreed stop; returns the last step checkpointed."""
        cfg, accum = self.cfg, self.cfg.optim.grad_accum_steps
        self.metrics.start(self.step)
        stream = iter(source)
        last_saved = self.step
        budget_end = time.perf_counter() + cfg.run.max_seconds if cfg.run.max_seconds else math.inf
        while self.step < cfg.run.steps:
            t0 = time.perf_counter()
            micro = list(itertools.islice(stream, accum))
            if len(micro) < accum:
                raise RuntimeError(
                    f"the data feed ended early at step {self.step} ({len(micro)} micro-batches)"
                )
            t_update = time.perf_counter()
            stats = self.last_stats = self.train_step(micro, stop=bool(stop.signum), budget_end=budget_end)
            stats["update_ms"] = (time.perf_counter() - t_update) * 1e3
            self.step += 1
            self.data_position += accum
            if self.rollouts is not None:
                stats |= step_samples(micro, self.step - 1)
                stats["sync_ms"] = self.rollouts.publish(self.step, self.model)
                self._write_samples(micro)
            self.metrics.log_step(
                self.step, self._step_record(stats, micro, source, time.perf_counter() - t0)
            )
            if stats["stop"]:  # a rank got SIGINT/SIGTERM: every rank knows it from this step's all-reduce
                return last_saved
            if stats["out_of_time"]:  # run.max_seconds: the run ends here, as at run.steps
                log.info("run.max_seconds=%g reached after step %d", cfg.run.max_seconds, self.step)
                break
            if cfg.run.eval_every and self.step % cfg.run.eval_every == 0:
                self._run_eval()
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
                last_saved = self.step
        return last_saved

    def _finish(self, last_saved: int) -> dict[str, Any]:
        """Final evaluation, checkpoint and export; summary.json and the summary line."""
        cfg, train_s = self.cfg, self.metrics.elapsed_s
        summary = {"step": self.step, "loss": self.last_stats.get("loss"), "kd": self.last_stats.get("kd")}
        summary |= {"ce": self.last_stats.get("ce"), "train_s": train_s, "samples": self.totals["samples"]}
        summary["samples_per_s"] = self.totals["samples"] / max(train_s, 1e-9)
        if cfg.uses_teacher:
            summary["teacher_wait_s"] = self.totals["teacher_wait_s"]
        if self.eval_data is not None:
            summary |= self.last_eval if self.last_eval.get("step") == self.step else self._run_eval()
        if last_saved != self.step:
            self.save()
        summary["checkpoint"] = str(self.checkpointer.step_dir(self.step))
        if cfg.checkpoint.export:
            summary["export"] = str(self.out_dir / "final")
            export_pretrained(self.model, self.tokenizer, self.out_dir / "final", rank=self.rank)
        self._write_summary(summary)
        self.metrics.log_summary(summary)
        return summary

    def train_step(
        self, micro: list[MicroBatch], *, stop: bool = False, budget_end: float = math.inf
    ) -> dict[str, Any]:
        """Accumulate gradients over the micro-batches, clip, step AdamW and the LR schedule. Two flags travel
        with the loss sums' all-reduce, so every rank sees the same: stats["stop"] (a rank was asked to stop)
        and stats["out_of_time"] (a rank passed `budget_end`, run.max_seconds)."""
        sums, n_tokens = accumulate_gradients(
            self.model, micro, distill=self.cfg.distill, device=self.device, dp_size=self.dims.dp_size
        )
        gnorm = clip_grad_norm(self.model, self.cfg.optim.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        flags = torch.tensor([float(stop), float(time.perf_counter() > budget_end)], dtype=sums.dtype)
        reduced = all_reduce_sum(torch.cat([sums, flags]))
        means = (reduced[:-2] / max(n_tokens, 1.0)).tolist()
        stats = {k: None if math.isnan(v) else v for k, v in zip(LossSums._fields, means, strict=True)}
        stop_any, late = (bool(f > 0) for f in reduced[-2:])
        return stats | {
            "lr": lr,
            "gnorm": gnorm,
            "tokens": int(n_tokens),
            "stop": stop_any,
            "out_of_time": late,
        }

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
        self.totals["samples"] += len(ids)
        if self.cfg.uses_teacher:
            wait_ms = sum(mb.wait_ms for mb in micro)
            self.totals["teacher_wait_s"] += wait_ms / 1e3
            record |= {"teacher_wait_ms": wait_ms, "prefetch": source.depth}
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
        path = self.resume_from
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

    def _say_how_to_resume(self, signum: int) -> None:
        if self.rank != 0:
            return
        config = self.out_dir / "config.yaml"
        cmd = f"asymkd train --config {config} --checkpoint.resume true"
        if self.dist.world_size > 1:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
            nodes = "" if local == self.dist.world_size else " (on every node, with its rendezvous options)"
            cmd = f"python -m asymkd.torchrun --nproc_per_node={local} -m asymkd.cli train --config {config} "
            cmd += f"--checkpoint.resume true{nodes}"
        log.warning(
            "interrupted by %s at step %d/%d: checkpoint %s\nresume with: %s",
            signal.Signals(signum).name, self.step, self.cfg.run.steps, self.checkpointer.step_dir(self.step), cmd,
        )  # fmt: skip

    def _write_samples(self, micro: list[MicroBatch]) -> None:
        """On-policy: every trained sequence, whole, to out_dir/samples-r<rank>.jsonl (one line per sample)."""
        with open(self.out_dir / f"samples-r{self.rank}.jsonl", "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in sample_lines(micro, self.step))

    def _write_summary(self, summary: dict[str, Any]) -> None:
        if self.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def close(self) -> None:
        self.metrics.close()
