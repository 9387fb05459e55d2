"""On-policy distillation (GKD, `distill.lmbda`) and sequence-level KD (`distill.seq_kd`): a rollout thread
per rank turns prompt batches into training batches ahead of the training loop; the configured teacher
source (live feed or in-process) scores them like any other batch, so every signal and loss works unchanged.

    rollouts = Rollouts(cfg.distill, cfg.teacher, prompts, plain_copy, seed=0, rank=r, ...)
    rollouts.publish(step, fsdp_model)                 # training thread: at start, then every weight_sync_steps
    batches = rollouts.start(start_index, count)       # -> build_teacher_source(..., batches, ...)
    ...
    record |= step_samples(micro, step_index)          # metrics.jsonl: who sampled what, with which weights
    rollouts.close()

Per micro-batch i (a seeded draw, the same on every rank and after a resume): the student samples the
completions with probability lmbda; otherwise the teacher servers generate them (seq_kd) or the dataset's
are used. Batch i trains at optimizer step n = i // grad_accum_steps.

Design (docs/onpolicy.md): the student samples on a plain (unsharded) copy of itself, in the rollout
thread, with a KV cache (rollout.sample_completions); the training thread refreshes it every
`weight_sync_steps` steps (an FSDP all-gather of the full weights, the only collective; the copy is loaded by
the rollout thread, so training never waits for a rollout to finish). Batch n is sampled by the weights of
step v*(n) = the newest refresh at or before n − d, d = max_staleness − (weight_sync_steps − 1): staleness
n − v* is in [d, max_staleness] (less only right after the start / a resume), deterministic whatever the
timing, so a run is reproducible. d ≥ 1 lets the rollout of step n+1 run while step n trains; d = 0 is
strictly on-policy (each rollout waits for the step before it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from student_trainer.config import DistillSection, TeacherSection, client_options
from student_trainer.parallel import all_gather_1d
from student_trainer.rollout import PromptDataset, build_batch, sample_completions

log = logging.getLogger("asymkd.student.rollout")
POLICIES = ("dataset", "student", "teacher")  # the codes of batch["policy"]
_END = object()
_POLL_S = 0.1


def batch_policy(distill: DistillSection, seed: int, index: int) -> str:
    """Who writes the completions of micro-batch `index`: a seeded draw, the same on every rank."""
    if np.random.default_rng([seed, 0x6B64, index]).random() < distill.lmbda:
        return "student"
    return "teacher" if distill.seq_kd else "dataset"


def policy_version(step: int, *, start: int, max_staleness: int, sync_steps: int) -> int:
    """v*(n): the weights (optimizer steps done) that sample the batch of step n (module docstring). Refreshes
    happen at `start` and every multiple of sync_steps after it."""
    target = step - (max_staleness - (sync_steps - 1))
    if target <= start:
        return start
    return max(target // sync_steps * sync_steps, start)


def full_weights(model: nn.Module) -> dict[str, Tensor]:
    """The FSDP student's full parameters (an all-gather: every rank calls it at the same step), by the names
    of the unwrapped model (activation checkpointing's wrapper removed)."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        out[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().clone()
    return out


class _WeightBox:
    """Published weight versions, handed from the training thread to the rollout thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._states: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        with self._cond:
            return len(self._states)

    def put(self, version: int, state: dict[str, Tensor]) -> None:
        with self._cond:
            self._states[version] = state
            self._cond.notify_all()

    def take(self, version: int, closed: threading.Event) -> dict[str, Tensor] | None:
        """Wait for `version` (None if closed meanwhile); drop the older ones."""
        with self._cond:
            while version not in self._states:
                if closed.is_set():
                    return None
                self._cond.wait(_POLL_S)
            self.drop_below(version)
            return self._states[version]

    def drop_below(self, version: int) -> None:
        """Forget versions older than `version`: the batches still to come never need them (v* only grows)."""
        with self._cond:
            for v in [v for v in self._states if v < version]:
                del self._states[v]


class Rollouts:
    """The rollout thread of one rank and its weight hand-over (module docstring)."""

    def __init__(
        self,
        distill: DistillSection,
        teacher: TeacherSection,
        prompts: PromptDataset,
        model: nn.Module | None,
        *,
        seed: int,
        rank: int,
        grad_accum_steps: int,
        eos_id: int,
        pad_id: int,
        vocab_limit: int,
    ) -> None:
        self.distill, self.teacher, self.prompts, self.model = distill, teacher, prompts, model
        self.seed, self.rank, self.accum = seed, rank, grad_accum_steps
        self.eos_id, self.pad_id, self.vocab_limit = eos_id, pad_id, vocab_limit
        self._box = _WeightBox()
        self._closed = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread: threading.Thread | None = None
        self._start_step = 0
        self._loaded = -1  # the weight version in `model`
        self._client = None

    # ------------------------------------------------------------------------------ training thread side
    def publish(self, step: int, model: nn.Module, *, start: bool = False) -> float:
        """Hand the weights after `step` optimizer steps to the rollout thread when a refresh is due (at the
        start, then every weight_sync_steps); returns the milliseconds it took (0 when none was due)."""
        if self.model is None or not (start or step % self.distill.weight_sync_steps == 0):
            return 0.0
        t0 = time.perf_counter()
        self._box.put(step, full_weights(model))
        return (time.perf_counter() - t0) * 1e3

    def start(self, start_index: int, count: int) -> Iterator[dict]:
        """Start producing micro-batches start_index .. start_index + count - 1; iterate for them in order."""
        self._start_step = start_index // self.accum
        args = (start_index, count)
        self._thread = threading.Thread(
            target=self._run, args=args, name=f"rollout-r{self.rank}", daemon=True
        )
        self._thread.start()
        return self._batches()

    def _batches(self) -> Iterator[dict]:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closed.is_set():
                    return
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the rollout thread (it ends at its next batch); safe to call twice."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------------------------- rollout thread side
    def _run(self, start_index: int, count: int) -> None:
        try:
            for index in range(start_index, start_index + count):
                batch = self._make(index)
                if batch is None or not self._put(batch):
                    return
            self._put(_END)
        except BaseException as e:  # raised in the training thread, by the source that reads the batches
            self._put(e)

    def _put(self, item: object) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _make(self, index: int) -> dict | None:
        """Micro-batch `index`: its prompts with completions from the policy drawn for it."""
        p = self.prompts.batch(index)
        policy, wait_ms = batch_policy(self.distill, self.seed, index), 0.0
        version = policy_version(
            index // self.accum,
            start=self._start_step,
            max_staleness=self.distill.max_staleness,
            sync_steps=self.distill.weight_sync_steps,
        )
        t0 = time.perf_counter()
        if policy == "student":
            if not self._load(version):  # waits until the training thread has published that version
                return None
            wait_ms, t0 = (time.perf_counter() - t0) * 1e3, time.perf_counter()
            completions = self._student(p["prompts"], index)
        elif policy == "teacher":
            completions = self._teacher(p["prompts"], index)
        else:
            completions = p["completions"]
        if policy != "student":  # weights older than this batch's are never needed again: free them
            self._box.drop_below(version)
        batch = build_batch(p["prompts"], completions, pad_id=self.pad_id, sample_ids=p["sample_ids"])
        n = len(completions)
        batch["policy"] = torch.full((n,), POLICIES.index(policy), dtype=torch.int64)
        batch["policy_step"] = torch.full((n,), version if policy == "student" else -1, dtype=torch.int64)
        batch["rollout_ms"] = torch.tensor((time.perf_counter() - t0) * 1e3, dtype=torch.float64)
        batch["weights_wait_ms"] = torch.tensor(wait_ms, dtype=torch.float64)
        return batch

    def _seed(self, index: int, tag: int) -> int:
        return int(np.random.default_rng([self.seed, tag, index, self.rank]).integers(2**62))

    def _load(self, version: int) -> bool:
        if self._loaded == version:
            return True
        state = self._box.take(version, self._closed)
        if state is None:
            return False
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(state[name])
        self._loaded = version
        return True

    def _student(self, prompts: list[list[int]], index: int) -> list[list[int]]:
        device = next(self.model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(self._seed(index, 1))
        return sample_completions(
            self.model,
            prompts,
            max_new_tokens=self.distill.max_new_tokens,
            temperature=self.distill.gen_temperature,
            top_p=self.distill.gen_top_p,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            generator=gen,
            vocab_limit=self.vocab_limit,
        )

    def _teacher(self, prompts: list[list[int]], index: int) -> list[list[int]]:
        """seq-KD: the teacher servers sample (teacher_server.client generate; gRPC retries per call)."""
        if self._client is None:
            from teacher_server.client import TeacherClient

            self._client = TeacherClient(self.teacher.targets, **client_options(self.teacher))
        greedy = {"greedy": True} if self.distill.gen_temperature == 0 else {}
        samples = self._client.generate(
            prompts,
            n=1,
            max_new_tokens=self.distill.max_new_tokens,
            temperature=self.distill.gen_temperature or 1.0,
            top_p=self.distill.gen_top_p,
            seed=self._seed(index, 2),
            **greedy,
        )
        return [s[0].token_ids.tolist() or [self.eos_id] for s in samples]


# ------------------------------------------------------------------------------------------------ records
def step_samples(micro: list, step_index: int) -> dict:
    """metrics.jsonl fields of one step's on-policy batches, all ranks in rank order (a collective): per
    sample its hash, policy and the step of the weights that sampled it (None: not the student), the
    teacher's summed log-prob of its completion (when the signal carries it); the step's staleness (max
    over student samples), rollout time (this rank's)."""
    keys = ("sample_hash", "policy", "policy_step")
    hashes, policy, version = (all_gather_1d(torch.cat([mb.batch[k] for mb in micro])).tolist() for k in keys)
    record = {
        "sample_hashes": hashes,
        "sample_policy": [POLICIES[p] for p in policy],
        "sample_policy_step": [v if v >= 0 else None for v in version],
        "staleness": max((step_index - v for v in version if v >= 0), default=None),
        "rollout_ms": sum(float(mb.batch["rollout_ms"]) for mb in micro),
        "weights_wait_ms": sum(float(mb.batch["weights_wait_ms"]) for mb in micro),
    }
    if all(mb.teacher is not None and mb.teacher.target_logprob is not None for mb in micro):
        lp = [(mb.teacher.target_logprob * mb.batch["loss_mask"]).sum(1) for mb in micro]
        record["sample_teacher_logprob"] = all_gather_1d(torch.cat(lp).double()).tolist()
    return record


def sample_lines(micro: list, step: int) -> list[dict]:
    """This rank's samples of one step as JSON lines (out_dir/samples-r<rank>.jsonl): the whole sequence."""
    lines = []
    for mb in micro:
        b = mb.batch
        for i in range(len(b["sample_ids"])):
            n = int(b["prompt_len"][i]) + int(b["loss_mask"][i].sum())
            lines.append(
                {
                    "step": step,
                    "sample_id": int(b["sample_ids"][i]),
                    "hash": int(b["sample_hash"][i]),
                    "policy": POLICIES[int(b["policy"][i])],
                    "policy_step": int(b["policy_step"][i]) if b["policy_step"][i] >= 0 else None,
                    "prompt_len": int(b["prompt_len"][i]),
                    "tokens": b["input_ids"][i, :n].tolist(),
                }
            )
    return lines
