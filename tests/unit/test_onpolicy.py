"""On-policy pieces without processes: the rows built from prompt + completion (masks and the loss
denominator), student sampling with a KV cache against a no-cache reference, the prompt order, the batch
policy draw, the staleness rule, and the config errors (one line naming the key, exit 2)."""

from __future__ import annotations

import pytest
import torch

from asymkd.cli import train
from asymkd.config import ConfigError, load_config
from student_trainer.config import DistillSection, TrainConfig
from student_trainer.onpolicy import batch_policy, policy_version
from student_trainer.rollout import PromptDataset, build_batch, sample_completions, sample_hash
from student_trainer.sources.base import MicroBatch
from student_trainer.step import accumulate_gradients, loss_sums

EOS, PAD = 0, 0


def test_rows_mask_exactly_the_completion_with_its_eos():
    prompts, completions = [[5, 6, 7], [8]], [[9, 10, EOS], [11, 12, 13, 14]]  # the second hit max_new_tokens
    b = build_batch(prompts, completions, pad_id=PAD, sample_ids=torch.tensor([3, 4]))
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 10, EOS], [8, 11, 12, 13, 14, PAD]]
    # row t predicts token t+1: targets are 9, 10, EOS (rows 2..4) and 11..14 (rows 0..3)
    assert b["loss_mask"].tolist() == [[False, False, True, True, True], [True, True, True, True, False]]
    targets = b["input_ids"][:, 1:][b["loss_mask"]].tolist()
    assert targets == [9, 10, EOS, 11, 12, 13, 14]
    assert b["prompt_len"].tolist() == [3, 1]
    assert b["sample_hash"].tolist() == [sample_hash([5, 6, 7, 9, 10, EOS]), sample_hash([8, 11, 12, 13, 14])]
    assert sample_hash([1, 2]) != sample_hash([2, 1]) and 0 <= sample_hash([1]) < 2**63


def test_the_loss_denominator_counts_generated_tokens_only(tiny_student_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    prompts, completions = [[5, 6, 7, 8, 9, 10], [8]], [[9, EOS], [11, 12, 13]]
    b = build_batch(prompts, completions, pad_id=PAD, sample_ids=torch.tensor([0, 1]))
    mb = MicroBatch(b)
    sums, n_tokens = accumulate_gradients(model, [mb], distill=DistillSection(), device=torch.device("cpu"))
    assert n_tokens == 5  # 2 + 3 completion tokens: no prompt, no padding
    # the CE sum is over exactly those 5 targets (brute force: per-token CE of the completion tokens)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"]).logits
        ce = loss_sums(logits, b["input_ids"], b["loss_mask"], None, DistillSection()).ce
        lp = torch.log_softmax(logits[:, :-1].double(), -1)
        rows = [(0, 5, 9), (0, 6, EOS), (1, 0, 11), (1, 1, 12), (1, 2, 13)]
        ref = -sum(float(lp[i, t, tok]) for i, t, tok in rows)
    assert float(ce) == pytest.approx(ref, rel=1e-5)
    assert float(sums[2]) == pytest.approx(ref, rel=1e-5)


def _greedy_reference(model, prompt: list[int], n: int, eos: int) -> list[int]:
    """No cache, no padding: one full forward per new token."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok == eos:
            break
    return out


def test_kv_cache_sampling_of_left_padded_prompts_matches_a_full_forward(tiny_student_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40], [100, 200, 300]]
    eos = 3  # a frequent-enough id that some greedy continuation may stop on it; none is required to
    got = sample_completions(
        model, prompts, max_new_tokens=12, temperature=0, top_p=1.0, eos_id=eos, pad_id=PAD
    )
    assert got == [_greedy_reference(model, p, 12, eos) for p in prompts]


def test_sampling_is_seeded_stops_at_eos_and_keeps_to_the_vocab_limit(tiny_student_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir).eval()
    prompts = [[5, 6, 7], [8, 9]] * 8

    def draw(seed: int, **kw) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        opts = {"max_new_tokens": 20, "temperature": 1.5, "top_p": 1.0, "eos_id": -1, "pad_id": 1} | kw
        return sample_completions(model, prompts, generator=gen, **opts)

    free = draw(1)  # no EOS: every row runs to max_new_tokens
    assert free == draw(1) and free != draw(2) and all(len(row) == 20 for row in free)
    eos = free[0][5]  # with this id as EOS the same draws stop at its first occurrence, EOS kept
    stopped = draw(1, eos_id=eos)
    for row, full in zip(stopped, free, strict=True):
        cut = full.index(eos) + 1 if eos in full else 20
        assert row == full[:cut]
    assert len(stopped[0]) <= 6
    assert all(t < 50 for row in draw(3, vocab_limit=50, eos_id=49) for t in row)
    assert draw(4, top_p=1e-6, temperature=1.0) == draw(5, temperature=0)  # a tiny top_p keeps the argmax


def test_prompts_are_seeded_disjoint_over_ranks_and_cut_to_fit():
    docs = [([10 + i] * (i % 7 + 1) + [20 + i] * 5 + [EOS], i % 7 + 1) for i in range(20)]
    shards = [
        PromptDataset(docs, micro_batch_size=2, seq_len=8, max_new_tokens=4, eos_id=EOS, rank=r, world_size=2)
        for r in range(2)
    ]
    epoch0 = [i for s in shards for b in range(5) for i in s.batch(b)["sample_ids"].tolist()]
    assert sorted(epoch0) == list(range(20))  # one epoch: every prompt once, over both ranks
    assert shards[0].batch(7)["sample_ids"].tolist() == shards[0].batch(7)["sample_ids"].tolist()
    b = shards[0].batch(0)
    for p, c in zip(b["prompts"], b["completions"], strict=True):
        assert 1 <= len(p) <= 4 and len(p) + len(c) <= 8  # prompts keep their last seq_len - max_new tokens
    empty = PromptDataset([([5, EOS], 0)], micro_batch_size=1, seq_len=8, max_new_tokens=4, eos_id=EOS)
    assert empty.batch(0)["prompts"] == [[EOS]]  # no prompt: generation starts at EOS


def test_batch_policy_is_a_seeded_share_of_batches():
    def share(**kw) -> float:
        distill = DistillSection(**kw)
        return sum(batch_policy(distill, 0, i) == "student" for i in range(2000)) / 2000

    assert share(lmbda=1.0) == 1.0 and share(lmbda=0.0, seq_kd=True) == 0.0
    assert 0.45 < share(lmbda=0.5) < 0.55
    mixed = DistillSection(lmbda=0.5, seq_kd=True)
    assert {batch_policy(mixed, 0, i) for i in range(50)} == {"student", "teacher"}
    assert {batch_policy(DistillSection(lmbda=0.5), 0, i) for i in range(50)} == {"student", "dataset"}
    assert [batch_policy(mixed, 3, i) for i in range(20)] == [batch_policy(mixed, 3, i) for i in range(20)]


@pytest.mark.parametrize(("staleness", "sync"), [(0, 1), (1, 1), (2, 1), (1, 2), (3, 2), (4, 3)])
@pytest.mark.parametrize("start", [0, 5])
def test_policy_weights_are_published_ones_within_the_staleness_bound(staleness, sync, start):
    published = {start} | {v for v in range(start, 60) if v % sync == 0}
    d = staleness - (sync - 1)
    for n in range(start, 50):
        v = policy_version(n, start=start, max_staleness=staleness, sync_steps=sync)
        assert v in published and v <= n
        assert n - v <= staleness
        if (
            n - start >= staleness
        ):  # after the start-up steps: never fresher than n - d (what lets it overlap)
            assert n - v >= d


BASE = ["--model.tokenizer", "/tok", "--data.paths", "[x.jsonl]", "--data.format", "prompt_completion"]
LIVE = [*BASE, "--teacher.targets", "[a:1]"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ([*LIVE, "--distill.lmbda", "1.5"], "distill: lmbda=1.5 is out of range"),
        ([*LIVE, "--distill.gen_top_p", "0"], "distill: gen_top_p=0.0 is out of range"),
        ([*LIVE, "--distill.max_new_tokens", "0"], "distill: max_new_tokens=0 is out of range"),
        (
            [*LIVE, "--distill.weight_sync_steps", "4", "--distill.max_staleness", "2"],
            "distill: max_staleness=2 is below weight_sync_steps - 1 (3)",
        ),
        (
            [*LIVE, "--distill.lmbda", "1", "--data.format", "text"],
            "distill.lmbda needs prompts: data.format='text' is not prompt_completion | messages",
        ),
        ([*BASE, "--distill.seq_kd", "true"], "distill.seq_kd=true needs teacher.targets"),
        ([*BASE, "--distill.lmbda", "0.5"], "distill.lmbda needs a live teacher"),
        (
            [*LIVE, "--distill.lmbda", "1", "--distill.max_new_tokens", "512"],
            "distill.max_new_tokens=512 leaves no room for a prompt in data.seq_len=512",
        ),
    ],
)
def test_on_policy_config_errors_name_the_key(flags, needle):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, flags)
    assert needle in str(err.value)


def test_on_policy_keys_load_and_a_mistake_exits_2(capsys):
    cfg = load_config(TrainConfig, None, [*LIVE, "--distill.lmbda", "0.5", "--distill.seq_kd", "true"])
    assert cfg.distill.on_policy and cfg.distill.max_staleness == 1 and cfg.distill.weight_sync_steps == 1
    assert not load_config(TrainConfig, None, LIVE).distill.on_policy
    assert train([*LIVE, "--distill.lmbda", "-0.1"]) == 2
    assert capsys.readouterr().err == "asymkd train: config error: distill: lmbda=-0.1 is out of range\n"


def test_chat_prompts_end_with_the_generation_prompt_and_skip_held_out_records(tiny_student_dir, tmp_path):
    import json

    from transformers import AutoTokenizer

    from student_trainer.config import DataSection
    from student_trainer.data import load_prompt_documents

    tok = AutoTokenizer.from_pretrained(tiny_student_dir)
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(10):
            msgs = [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    data = DataSection(paths=[str(path)], format="messages", eval_fraction=0.2, seq_len=64, cache=False)
    docs = load_prompt_documents(data, tok)
    assert len(docs) == 8  # the held-out 20 % are not prompts
    prompts = [tok.decode(ids[:n]) for ids, n in docs]
    completions = [tok.decode(ids[n:]) for ids, n in docs]
    assert all(p.startswith("<user>question ") and p.endswith("\n<assistant>") for p in prompts)
    assert all(c.startswith("answer ") and c.endswith("\n" + tok.eos_token) for c in completions)
    assert [p[len("<user>question ")] for p in prompts] == [c[len("answer ")] for c in completions]


def _rollouts(model, copy, **distill):
    from student_trainer.config import TeacherSection
    from student_trainer.onpolicy import Rollouts

    docs = [([5 + i, 6, 7, 8, 20 + i, EOS], 4) for i in range(16)]
    prompts = PromptDataset(docs, micro_batch_size=2, seq_len=16, max_new_tokens=4, eos_id=EOS)
    cfg = DistillSection(max_new_tokens=4, gen_temperature=1.0, **distill)
    opts = {"seed": 0, "rank": 0, "grad_accum_steps": 1, "eos_id": EOS, "pad_id": PAD, "vocab_limit": 512}
    return Rollouts(cfg, TeacherSection(), prompts, copy, **opts)


def test_rollout_thread_samples_with_the_weights_of_the_step_it_must_and_frees_the_others(tiny_student_dir):
    import copy as copying

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    reference = copying.deepcopy(model).eval()
    rollouts = _rollouts(model, copying.deepcopy(model).eval(), lmbda=0.5, max_staleness=1)
    published = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    rollouts.publish(0, model, start=True)
    batches = rollouts.start(0, 12)
    policies = []
    for step in range(12):  # the training loop: take a batch, change the weights, publish them
        b = next(batches)
        policies.append(int(b["policy"][0]))
        if policies[-1] == 1:  # the student's: sampled by exactly the weights of step v*(step)
            v = policy_version(step, start=0, max_staleness=1, sync_steps=1)
            assert b["policy_step"].tolist() == [v, v]
            reference.load_state_dict(published[v])
            gen = torch.Generator().manual_seed(rollouts._seed(step, 1))
            p = rollouts.prompts.batch(step)["prompts"]
            want = sample_completions(
                reference,
                p,
                max_new_tokens=4,
                temperature=1.0,
                top_p=1.0,
                eos_id=EOS,
                pad_id=PAD,
                generator=gen,
            )
            assert b["input_ids"][b["loss_mask"].any(1)].shape[0] == 2
            got = [
                b["input_ids"][i, len(p[i]) : len(p[i]) + int(b["loss_mask"][i].sum())].tolist()
                for i in (0, 1)
            ]
            assert got == want
        else:
            assert b["policy_step"].tolist() == [-1, -1]
        with torch.no_grad():
            model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
        published[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        rollouts.publish(step + 1, model)
        # versions no batch to come needs are freed: a bound (staleness + the batches queued ahead + the one
        # just published), not one copy per step
        assert len(rollouts._box) <= 5
    assert next(batches, None) is None and set(policies) == {0, 1}
    rollouts.close()


def test_closing_stops_a_rollout_waiting_for_weights(tiny_student_dir):
    import copy as copying

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    rollouts = _rollouts(model, copying.deepcopy(model).eval(), lmbda=1.0, max_staleness=0)
    rollouts.publish(0, model, start=True)
    batches = rollouts.start(0, 5)
    assert next(batches)["policy_step"].tolist() == [0, 0]  # step 0: the start weights
    # step 1 needs the weights after step 1 (strictly on-policy), which never come: close must not hang
    rollouts.close()
    assert not rollouts._thread.is_alive()
    assert next(batches, None) is None
