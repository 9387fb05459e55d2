"""TRL GKDTrainer side of bench/onpolicy.py: on-policy KD (``lmbda=1``), one run, JSON on stdout. Runs inside
bench/.venv-trl (TRL is not an asymkd dependency); onpolicy.py creates that venv and calls this script, e.g.

    bench/.venv-trl/bin/python bench/trl_onpolicy_run.py --teacher T_DIR --student S_DIR \
        --prompts prompts.json --steps 12 --batch-size 4 --max-new-tokens 64 --beta 1.0

The prompts are the exact token ids asymkd's on-policy trainer samples from (a JSON file written by
onpolicy.py: {"prompts": [[ids], ...], "completions": [[ids], ...]}, steps × batch rows in training order).
Every step (``lmbda=1``): the student generates ``max_new_tokens`` per prompt (HF ``generate``, KV cache,
temperature 1, top_p 1, top_k 0), then the student and the teacher run forward on prompt + completion
(full-vocabulary logits, one process) and the generalized JSD(β) over the completion tokens is
back-propagated.

Besides samples/s (trl_gkd_run.timed_result) it reports where a step's time goes: ``rollout`` (the trainer's
``generate_on_policy_outputs``), ``teacher`` (the teacher model's forward) and ``update`` (the rest of the
step: student forward, loss, backward, optimizer), measured by wrapping those two methods.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_gkd_run import gkd_config, load_models, make_timer_callback, timed_result

PHASES = ("rollout", "teacher", "update")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="HF folder of the teacher")
    p.add_argument("--student", required=True, help="HF folder of the (random-init) student")
    p.add_argument("--prompts", required=True, help='JSON {"prompts": [[ids]], "completions": [[ids]]}')
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=1.0, help="generalized JSD β (1 = reverse KL)")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps left out of samples/s and the split")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_dataset(path: str, n_rows: int):
    from datasets import Dataset

    data = json.loads(Path(path).read_text())
    prompts, completions = data["prompts"], data["completions"]
    if len(prompts) < n_rows or len(completions) != len(prompts):
        raise ValueError(f"--prompts holds {len(prompts)} prompts; {n_rows} are needed (steps × batch size)")
    return Dataset.from_dict({"prompt_ids": prompts[:n_rows], "completion_ids": completions[:n_rows]})


def make_collate(pad_id: int):
    """Prompts left-padded (`prompts`, `prompt_attention_mask`: what GKD generates from) and prompt + dataset
    completion as `input_ids` / `labels` (replaced by the rollout at lmbda=1; they only give the Trainer a
    non-empty target count)."""
    import torch

    def collate(features: list[dict]) -> dict:
        width = max(len(f["prompt_ids"]) for f in features)
        rows = [f["prompt_ids"] + f["completion_ids"] for f in features]
        full = max(width + len(f["completion_ids"]) for f in features)
        prompts = torch.full((len(features), width), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompts)
        ids = torch.full((len(features), full), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, f in enumerate(features):
            n = len(f["prompt_ids"])
            prompts[i, width - n :] = torch.tensor(f["prompt_ids"])
            prompt_mask[i, width - n :] = 1
            ids[i, : len(rows[i])] = torch.tensor(rows[i])
            labels[i, n : len(rows[i])] = torch.tensor(f["completion_ids"])
        attn = (labels != -100).long()
        attn[:, :width] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "prompts": prompts,
                "prompt_attention_mask": prompt_mask}  # fmt: skip

    return collate


class PhaseClock:
    """Seconds spent inside wrapped callables, cumulative per phase (CUDA synchronized around each call)."""

    def __init__(self, cuda: bool) -> None:
        self.total = {"rollout": 0.0, "teacher": 0.0}
        self.generated_tokens = 0
        self.cuda = cuda

    def wrap(self, fn, phase: str):
        import torch

        def timed(*args, **kwargs):
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            self.total[phase] += time.perf_counter() - t0
            if phase == "rollout":  # (ids, attention mask, labels): labels mark the completion's tokens
                self.generated_tokens += int((out[2] != -100).sum())
            return out

        return timed


def run(args: argparse.Namespace) -> dict:
    import tempfile

    import torch
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDTrainer

    tok, student, teacher = load_models(args)
    dataset = build_dataset(args.prompts, args.steps * args.batch_size)
    max_len = max(len(p) for p in dataset["prompt_ids"]) + args.max_new_tokens
    tmp = tempfile.TemporaryDirectory(prefix="trl-onpolicy-")
    config = gkd_config(
        args, tmp.name, max_len, lmbda=1.0, max_new_tokens=args.max_new_tokens, temperature=1.0
    )
    timer = make_timer_callback()
    clock = PhaseClock(cuda=args.device == "cuda")
    marks: list[tuple[float, float, int]] = []

    class PhaseMarks(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            marks.append((clock.total["rollout"], clock.total["teacher"], clock.generated_tokens))

    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=make_collate(tok.pad_token_id),
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[timer, PhaseMarks()],
    )
    # instance attributes shadow the (static) method and the module's forward: training_step and
    # compute_loss call them through the instance
    trainer.generate_on_policy_outputs = clock.wrap(trainer.generate_on_policy_outputs, "rollout")
    trainer.teacher_model.forward = clock.wrap(trainer.teacher_model.forward, "teacher")
    t0 = time.perf_counter()
    trainer.train()
    wall_s = time.perf_counter() - t0
    tmp.cleanup()
    res = timed_result(timer, args, wall_s, max_len)
    w = res["warmup_steps"]
    n = len(marks) - w
    first = marks[w - 1] if w > 0 else (0.0, 0.0, 0)
    rollout, teacher_s = (marks[-1][0] - first[0]) / n, (marks[-1][1] - first[1]) / n
    split = {"rollout": rollout, "teacher": teacher_s, "update": res["step_s_mean"] - rollout - teacher_s}
    return res | {
        "impl": "trl_gkd_onpolicy",
        "lmbda": 1.0,
        "max_new_tokens": args.max_new_tokens,
        "steps_per_s": 1.0 / res["step_s_mean"],
        "phase_s_mean": split,
        "completion_tokens_per_step": (marks[-1][2] - first[2]) / n,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # Trainer/TRL log to stdout; keep it for the JSON line
        result = run(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
