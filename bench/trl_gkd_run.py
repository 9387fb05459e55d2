"""TRL GKDTrainer side of bench/vs_trl.py: one run, JSON on stdout. Runs inside bench/.venv-trl (TRL is not an
asymkd dependency); vs_trl.py creates that venv and calls this script, e.g.

    bench/.venv-trl/bin/python bench/trl_gkd_run.py --teacher T_DIR --student S_DIR --tokens tokens.pt \
        --steps 20 --batch-size 4 --beta 0.0

The data are the exact token rows asymkd trains on (a (N, L) int64 tensor saved by vs_trl.py), so both sides
see the same batches. GKD with ``lmbda=0`` (no on-policy generation) and ``seq_kd=False`` is plain supervised
KD: each step runs the student forward, the teacher forward (full-vocabulary logits for both, one process,
one after the other) and the generalized JSD(β) of TRL over the full vocabulary.

Reports samples/s after ``--warmup-steps`` steps, the peak RSS of the process (getrusage, includes both
models) and the last logged loss. Only the standard library, torch, transformers, datasets and trl are used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="HF folder of the teacher")
    p.add_argument("--student", required=True, help="HF folder of the (random-init) student")
    p.add_argument(
        "--tokens",
        required=True,
        help="torch.save'd {'input_ids': (N, L), 'labels': (N, L), -100 = no target}",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps left out of samples/s")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (bf16 autocast, teacher in bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--output-dir", default=None, help="Trainer output dir (nothing is saved; default: a temp dir)"
    )
    return p.parse_args(argv)


def build_dataset(tokens_path: str, n_rows: int):
    """The rows in the order asymkd trains on them; `labels` carries asymkd's loss mask (-100 = no target:
    document starts, padding), so both sides average the divergence over the same target tokens."""
    import torch
    from datasets import Dataset

    data = torch.load(tokens_path)
    ids, labels = data["input_ids"], data["labels"]
    if ids.dim() != 2 or ids.shape != labels.shape:
        raise ValueError(
            f"--tokens: input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} must be (N, L)"
        )
    if ids.shape[0] < n_rows:
        raise ValueError(f"--tokens holds {ids.shape[0]} rows; {n_rows} are needed (steps × batch size)")
    ds = Dataset.from_dict({"input_ids": ids[:n_rows].tolist(), "labels": labels[:n_rows].tolist()})
    return ds, ids.shape[1]


def collate(features: list[dict]) -> dict:
    import torch

    ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock time at the end of every optimizer step, and the logged losses."""

        def __init__(self) -> None:
            self.t_begin = None
            self.t_end: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t_end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def load_models(args: argparse.Namespace):
    """(tokenizer, student in fp32, teacher in the run's dtype), seeded; torch threads set."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.student)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    bf16 = args.dtype == "bfloat16"
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)  # fp32 master weights
    teacher = AutoModelForCausalLM.from_pretrained(
        args.teacher, dtype=torch.bfloat16 if bf16 else torch.float32
    )
    return tok, student, teacher


def gkd_config(args: argparse.Namespace, out_dir: str, max_length: int, **overrides):
    """The GKDConfig both TRL runners use (TRL's defaults where the bench sets nothing); `overrides` are
    GKDConfig fields (lmbda, max_new_tokens, ...)."""
    from trl.experimental.gkd import GKDConfig

    bf16 = args.dtype == "bfloat16"
    fields = {
        "lmbda": 0.0,  # no on-policy generation: supervised KD on the given tokens
        "seq_kd": False,
        "beta": args.beta,
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": args.lr,
        "lr_scheduler_type": "cosine" if args.lr_warmup_steps else "constant",
        "warmup_steps": args.lr_warmup_steps,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "max_length": max_length,
        "use_cpu": args.device == "cpu",
        "bf16": bf16,
        "fp16": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "sequential",  # the rows are already in asymkd's (shuffled) training order
        "seed": args.seed,
        "data_seed": args.seed,
    }
    return GKDConfig(output_dir=out_dir, **(fields | overrides))


def timed_result(timer, args: argparse.Namespace, wall_s: float, seq_len: int) -> dict:
    """samples/s after the warm-up steps, peak RSS, losses, versions: the JSON of a TRL run."""
    import torch
    import transformers
    import trl

    w = min(args.warmup_steps, len(timer.t_end) - 1)
    timed_steps = len(timer.t_end) - w
    t_start = timer.t_end[w - 1] if w > 0 else timer.t_begin
    timed_s = timer.t_end[-1] - t_start
    return {
        "impl": "trl_gkd",
        "beta": args.beta,
        "steps": len(timer.t_end),
        "batch_size": args.batch_size,
        "seq_len": seq_len,
        "warmup_steps": w,
        "samples_per_s": timed_steps * args.batch_size / timed_s,
        "tokens_per_s": timed_steps * args.batch_size * seq_len / timed_s,
        "step_s_mean": timed_s / timed_steps,
        "train_wall_s": wall_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "final_loss": timer.losses[-1] if timer.losses else None,
        "losses": timer.losses,
        "torch_threads": torch.get_num_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
    }


def run(args: argparse.Namespace) -> dict:
    import tempfile

    from trl.experimental.gkd import GKDTrainer

    tok, student, teacher = load_models(args)
    dataset, seq_len = build_dataset(args.tokens, args.steps * args.batch_size)
    tmp = tempfile.TemporaryDirectory(prefix="trl-gkd-")  # the Trainer writes a model card / final weights
    config = gkd_config(args, args.output_dir or tmp.name, seq_len)
    timer = make_timer_callback()
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=collate,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[timer],
    )
    t0 = time.perf_counter()
    trainer.train()
    wall_s = time.perf_counter() - t0
    tmp.cleanup()
    return timed_result(timer, args, wall_s, seq_len) | {"lmbda": 0.0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Trainer/TRL print progress and logs to stdout; keep stdout for the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
