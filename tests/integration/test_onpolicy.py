"""On-policy distillation (GKD) and sequence-level KD under real torchrun (2 gloo ranks) against a real teacher
server on loopback. The teacher is the tiny test teacher with its output layer scaled ×8 (a peaked
distribution the tiny student can move towards).

- λ = 1: every batch sampled by the student; the teacher scored exactly those sequences (each sample's
  teacher log-prob in metrics.jsonl equals an in-process forward of the teacher on the recorded tokens, whose
  hash metrics.jsonl holds); the loss counts the generated tokens only; staleness and the rollout / teacher /
  update times are in every record; KD falls.
- resume: a run resumed from its step-5 checkpoint trains the same prompts in the same order; the samples
  drawn by the same weights in both runs (step 7's, by the step-5 weights) are the same, bit for bit.
- λ = 0.5, max_staleness 0: student and dataset batches mix by a seeded draw; dataset rows are the corpus's
  prompt + completion; student rows were sampled by the weights being trained (staleness 0).
- seq_kd: the teacher servers generate the completions: the teacher likes them far better than the student's.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from teacher_server.launch import LocalTeacher
from tests.integration.test_train_torchrun import WORDS as TRAIN_WORDS
from tests.integration.test_train_torchrun import read_metrics, run_train

pytestmark = pytest.mark.slow
WORDS = [w for w in TRAIN_WORDS if not w.endswith("ly")]  # no adverbs: short, sharp prompts


@pytest.fixture(scope="module")
def sharp_teacher_dir(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharp_teacher")
    shutil.copytree(tiny_teacher_dir, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher(sharp_teacher_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "teacher.log"
    args = ["--model", str(sharp_teacher_dir), "--backend", "hf", "--max-top-k", "64"]
    with LocalTeacher(args, log_path=log, env={"OMP_NUM_THREADS": "1"}) as t:
        yield t


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy")
    rng = random.Random(0)
    with open(root / "pc.jsonl", "w") as f:
        for _ in range(64):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            completion = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return root


def train(root, teacher, tokenizer_dir, name: str, *overrides: str, **sections) -> tuple:
    cfg = {
        "model": {"tokenizer": str(tokenizer_dir), "hidden_size": 32, "num_layers": 2, "num_heads": 1},
        "data": {"paths": [str(root / "pc.jsonl")], "format": "prompt_completion", "seq_len": 48},
        "optim": {"lr": 3e-2, "micro_batch_size": 4, "schedule": "constant", "warmup_steps": 0},
        "distill": {"top_k": 16, "max_new_tokens": 16},
        "teacher": {"targets": [teacher.address], "prefetch": 2},
        "checkpoint": {"export": False},
        "run": {"out_dir": str(root / name), "steps": 10, "seed": 0},
    }
    for key, values in sections.items():
        cfg[key] = {**cfg[key], **values}
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_train(config, *overrides, cache=root / "cache")
    samples = [
        json.loads(line)
        for r in (0, 1)
        for line in (root / name / f"samples-r{r}.jsonl").read_text().splitlines()
    ]
    return read_metrics(root / name)[0], {s["hash"]: s for s in samples}, config


@pytest.fixture(scope="module")
def on_policy(root, teacher, sharp_teacher_dir):
    return train(
        root, teacher, sharp_teacher_dir, "lmbda1", distill={"lmbda": 1.0}, checkpoint={"every_steps": 5}
    )


def teacher_logprob(model, tokens: list[int], prompt_len: int) -> float:
    """Σ log p_teacher of the completion tokens (a full forward in this process)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0, :-1].double(), -1)
    rows = torch.arange(prompt_len - 1, len(tokens) - 1)
    return float(lp[rows, torch.tensor(tokens[prompt_len:])].sum())


def test_on_policy_run_trains_on_the_students_samples_as_the_teacher_scored_them(
    on_policy, sharp_teacher_dir
):
    steps, samples, _ = on_policy
    assert [r["step"] for r in steps] == list(range(1, 11))
    reference = AutoModelForCausalLM.from_pretrained(sharp_teacher_dir).eval()
    for r in steps:
        assert len(r["sample_hashes"]) == 2 * 4 and r["sample_policy"] == ["student"] * 8
        assert r["staleness"] == (0 if r["step"] == 1 else 1)  # max_staleness 1: the rollout overlaps a step
        assert r["sample_policy_step"] == [max(r["step"] - 2, 0)] * 8
        for key in ("rollout_ms", "teacher_wait_ms", "update_ms", "sync_ms"):
            assert r[key] >= 0, key
        mine = [samples[h] for h in r["sample_hashes"]]  # every sample trained is recorded whole
        assert [s["sample_id"] for s in mine] == r["sample_ids"]
        assert all(s["step"] == r["step"] and s["policy"] == "student" for s in mine)
        # the loss counts exactly the generated tokens (EOS included), nothing of the prompts or padding
        assert r["tokens"] == sum(len(s["tokens"]) - s["prompt_len"] for s in mine)
        # the teacher scored exactly these sequences: its answers are the reference's on the recorded tokens
        for s, got in zip(mine, r["sample_teacher_logprob"], strict=True):
            assert got == pytest.approx(teacher_logprob(reference, s["tokens"], s["prompt_len"]), abs=2e-3)
    assert all(len(s["tokens"]) - s["prompt_len"] <= 16 for s in samples.values())
    kd = [r["kd"] for r in steps]
    assert sum(kd[-3:]) < 0.95 * sum(kd[:3]), kd  # the student moves towards the teacher on its own samples


def test_resumed_on_policy_run_continues_with_the_same_prompts_and_samples(on_policy, root, teacher):
    steps_a, _, config = on_policy
    out_b = root / "lmbda1-resumed"
    step5 = root / "lmbda1" / "checkpoints" / "step_0000005"
    run_train(config, "--run.out_dir", str(out_b), "--checkpoint.resume", str(step5), cache=root / "cache")
    steps_b = read_metrics(out_b)[0]
    assert [r["step"] for r in steps_b] == list(range(6, 11))
    a = {r["step"]: r for r in steps_a}
    for r in steps_b:
        assert r["sample_ids"] == a[r["step"]]["sample_ids"]  # the same prompts, in the same order
    # step 6 was sampled by the resumed (step-5) weights: the step-4 ones it had in the first run are not in
    # the checkpoint. Step 7 is sampled by the step-5 weights in both runs: the very same samples. Later
    # steps differ, as the runs trained on different samples at step 6.
    assert steps_b[0]["staleness"] == 0 and steps_b[0]["sample_hashes"] != a[6]["sample_hashes"]
    assert steps_b[1]["sample_hashes"] == a[7]["sample_hashes"]
    assert [r["staleness"] for r in steps_b[1:]] == [1] * 4


def test_mixed_run_draws_student_or_dataset_completions_per_batch(root, teacher, sharp_teacher_dir):
    steps, samples, _ = train(
        root,
        teacher,
        sharp_teacher_dir,
        "mixed",
        distill={"lmbda": 0.5, "max_staleness": 0},
        run={"steps": 6},
    )
    tok = AutoTokenizer.from_pretrained(sharp_teacher_dir)
    records = [json.loads(line) for line in (root / "pc.jsonl").read_text().splitlines()]
    corpus = {}
    for i, rec in enumerate(records):
        prompt = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        corpus[i] = (
            prompt + tok(rec["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        )
    policies = {p for r in steps for p in r["sample_policy"]}
    assert policies == {"student", "dataset"}
    for r in steps:
        assert len(set(r["sample_policy"])) == 1  # one draw per batch, the same on both ranks
        for h, sid in zip(r["sample_hashes"], r["sample_ids"], strict=True):
            s = samples[h]
            if s["policy"] == "dataset":
                # the corpus's prompt + completion + EOS, cut to data.seq_len
                assert s["tokens"] == corpus[sid % len(records)][:48] and s["policy_step"] is None
            else:  # max_staleness 0: sampled by the very weights this step trains
                assert s["policy_step"] == r["step"] - 1
        assert r["staleness"] == (0 if r["sample_policy"][0] == "student" else None)


def test_seq_kd_trains_on_completions_the_teacher_generated(on_policy, root, teacher, sharp_teacher_dir):
    steps, samples, _ = train(
        root, teacher, sharp_teacher_dir, "seqkd", distill={"seq_kd": True}, run={"steps": 4}
    )
    assert {p for r in steps for p in r["sample_policy"]} == {"teacher"}
    assert all(r["staleness"] is None for r in steps)

    def per_token(runs) -> float:
        lp = [x for r in runs for x in r["sample_teacher_logprob"]]
        n = [r["tokens"] for r in runs]
        return sum(lp) / sum(n)

    # the teacher's own samples are far likelier under it than the (early) student's
    assert per_token(steps) > per_token(on_policy[0][:4]) + 1.0, (
        per_token(steps),
        per_token(on_policy[0][:4]),
    )
    assert all(1 <= len(s["tokens"]) - s["prompt_len"] <= 16 for s in samples.values())
