"""Checkpoints of a sharded run with torch.distributed.checkpoint (DCP), and the final HF export.

    ckpt = Checkpointer(cfg.checkpoint, out_dir, rank)
    ckpt.save(step, model, optimizer, {"step": step, "data_position": i, "scheduler": sched.state_dict()})
    state = ckpt.load(ckpt.resume_path(), model, optimizer)        # continues bit-identically (CPU, fp32)
    export_pretrained(model, tokenizer, out_dir / "final", rank=rank)  # a folder transformers loads

Layout: `<dir>/step_0000100/` holds the DCP shards of model + optimizer (each rank writes its own shards;
`get_state_dict`/`set_state_dict` translate FSDP2 DTensors), `trainer_rank{r}.pt` (step, data position,
scheduler, RNG states of rank r) and `done` (its step). Saving is atomic: every rank writes into
`step_0000100.tmp/`, and rank 0 renames it once all ranks are done, so a kill never leaves a half-written
step folder (a leftover `.tmp` is removed by the next save). The newest `keep` complete folders are kept.

    check_out_dir(cfg.run, ckpt, resume=ckpt.resume_path())  # a used out_dir needs resume or run.overwrite
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from asymkd.config import ConfigError
from student_trainer.config import CheckpointSection, RunSection

log = logging.getLogger("asymkd.student")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    # Plain tensors/ints/tuples only, so the file loads with torch.load(weights_only=True) (no pickle).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, section: CheckpointSection, out_dir: str | Path, rank: int = 0) -> None:
        self.section, self.rank = section, rank
        self.dir = Path(section.dir).expanduser() if section.dir else Path(out_dir) / "checkpoints"

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}"

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (a `.tmp` folder is a save that did not finish)."""
        return sorted(p.parent for p in self.dir.glob("step_*/done") if not p.parent.name.endswith(".tmp"))

    def resume_path(self) -> Path | None:
        """The folder to resume from: `resume` = a folder, or true = the newest complete one (if any)."""
        resume = self.section.resume
        if resume is False or resume in ("", "false"):
            return None
        if resume is True or resume in ("true", "latest"):
            found = self.complete()
            return found[-1] if found else None
        path = Path(str(resume)).expanduser()
        if not (path / "done").exists() or path.name.endswith(".tmp"):
            raise ConfigError(f"checkpoint.resume={resume!r}: not a complete checkpoint folder")
        return path

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict) -> Path:
        path = self.step_dir(step)
        tmp = path.with_name(path.name + ".tmp")
        if self.rank == 0:
            for stale in (*self.dir.glob("step_*.tmp"), path):  # a kill mid-save, or a rerun of this step
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save({**trainer, "rng": rng_state()}, tmp / f"trainer_rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            (tmp / "done").write_text(json.dumps({"step": step}))
            tmp.rename(path)  # atomic: the folder is complete or absent
            for old in self.complete()[: -self.section.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()  # no rank goes on (or exits) before the checkpoint is complete
        log.info("checkpoint step %d -> %s", step, path)
        return path

    @staticmethod
    def step_of(path: Path) -> int:
        """The step a complete checkpoint folder holds."""
        return int(json.loads((path / "done").read_text())["step"])

    def leftovers(self) -> list[Path]:
        """What a previous run left in the checkpoint folder (complete or partial step folders)."""
        return sorted(self.dir.glob("step_*")) if self.dir.is_dir() else []

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore model + optimizer in place; return the trainer state and restore this rank's RNG."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        mine = path / f"trainer_rank{self.rank}.pt"
        if not mine.exists():  # resumed on more ranks than saved: same step/data position, rank 0's RNG
            log.warning("no %s: using rank 0's trainer state", mine.name)
            mine = path / "trainer_rank0.pt"
        trainer = torch.load(mine, weights_only=True)
        set_rng_state(trainer.pop("rng"))
        log.info("resumed from %s (step %d)", path, trainer["step"])
        return trainer


# What a run writes into run.out_dir besides config.yaml (a failed start leaves only that one).
RUN_FILES = ("metrics.jsonl", "summary.json", "final", "tensorboard")


def check_out_dir(run: RunSection, ckpt: Checkpointer, *, resume: Path | None, rank: int) -> None:
    """Refuse to train into an out_dir that holds another run's files, unless this run resumes from a checkpoint
    or `run.overwrite` is set (rank 0 then removes them; call on every rank)."""
    out = Path(run.out_dir)
    used = [out / f for f in RUN_FILES if (out / f).exists()] + ckpt.leftovers()
    if resume is None and used and not run.overwrite:
        wanted = ckpt.section.resume not in (False, "", "false")
        why = (
            f"checkpoint.resume: no checkpoint in {ckpt.dir}, so this run would start fresh; but "
            if wanted
            else ""
        )
        names = ", ".join(str(p) for p in used[:3]) + (" ..." if len(used) > 3 else "")
        raise ConfigError(
            f"{why}run.out_dir={str(out)!r} holds another run's files ({names}): set checkpoint.resume=true to "
            "continue it, run.overwrite=true to replace it, or another run.out_dir"
        )
    if resume is None and used:
        _barrier()  # every rank has looked before rank 0 removes
        if rank == 0:
            log.warning("run.overwrite: removing %s", ", ".join(str(p) for p in used))
            for p in used:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        _barrier()


def export_pretrained(model: nn.Module, tokenizer: Any, out: str | Path, *, rank: int = 0) -> Path | None:
    """Gather the full state dict on rank 0 (collective: call on every rank) and `save_pretrained` it."""
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = Path(out)
    if rank == 0:
        config = model.config
        with torch.device("meta"):  # the gathered tensors become the weights; nothing else is allocated
            fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None))
        fresh.load_state_dict(full, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            fresh.tie_weights()
        fresh.save_pretrained(out)
        tokenizer.save_pretrained(out)
        log.info("exported the student to %s", out)
    _barrier()
    return out if rank == 0 else None
