"""On-policy batches, piece by piece: prompts in data order, student sampling with a KV cache, and the rows
built from a prompt and its completion (the rollout thread that uses them is onpolicy.py).

    prompts = PromptDataset(load_prompt_documents(cfg.data, tok), micro_batch_size=B, rank=r, world_size=W)
    p = prompts.batch(i)          # {"prompts": [[ids]], "completions": [[ids]] (the dataset's), "sample_ids": (B,)}
    new = sample_completions(model, p["prompts"], max_new_tokens=64, temperature=1.0, top_p=1.0,
                             eos_id=eos, pad_id=pad, generator=torch.Generator().manual_seed(1))
    batch = build_batch(p["prompts"], new, pad_id=pad, sample_ids=p["sample_ids"])
    # input_ids (B, T), loss_mask (B, T-1), sample_ids (B,), sample_hash (B,), prompt_len (B,)

Rows: prompt + completion, right-padded to the batch's longest row. The loss mask covers exactly the
completion's tokens (row t predicts token t+1: rows len(prompt)-1 .. len(prompt)+len(completion)-2), its
EOS included when it has one; prompt and padding are never targets, so the step's target count (the loss
denominator, step.py) is the number of completion tokens. Prompts keep their last `seq_len - max_new_tokens`
tokens; dataset completions are cut to what is left of `seq_len`.

Order: micro-batch i on rank r takes prompt positions (i·B + j)·W + r of the epoch-wise permuted prompt list
(seeded by run.seed), as data.PackedDataset does with packed rows; sample_ids = epoch × N + prompt index.
A batch is a function of its index: a resumed run (trainer.data_position) gets the same prompts in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from student_trainer.data import EpochOrder

TokenDoc = tuple[
    list[int], int
]  # (token ids ending in EOS, number of prompt tokens): data.tokenize_documents


class PromptDataset:
    """Prompts (and their dataset completions) served as micro-batches of one rank (module docstring)."""

    def __init__(
        self,
        docs: list[TokenDoc],
        *,
        micro_batch_size: int,
        seq_len: int,
        max_new_tokens: int,
        eos_id: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not docs:
            raise ValueError("no prompts: the data holds no documents")
        keep = seq_len - max_new_tokens  # room left for the completion in a row of seq_len tokens
        self.prompts, self.completions = [], []
        for ids, n_prompt in docs:
            prompt = ids[:n_prompt][-keep:] if n_prompt else [eos_id]  # an empty prompt starts at EOS
            self.prompts.append(prompt)
            self.completions.append(ids[n_prompt:][: seq_len - len(prompt)])
        self.order = EpochOrder(
            len(self.prompts),
            batch_size=micro_batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=shuffle,
        )

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, index: int) -> dict:
        """Micro-batch `index` (counted from the start of the run) for this rank."""
        epochs, rows = self.order.pick(index)
        return {
            "prompts": [self.prompts[i] for i in rows],
            "completions": [self.completions[i] for i in rows],
            "sample_ids": torch.from_numpy(epochs * len(self) + rows),
        }


def sample_hash(ids: Sequence[int]) -> int:
    """A 63-bit fingerprint of a token sequence (prompt + completion), as metrics.jsonl records it."""
    digest = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_batch(
    prompts: list[list[int]], completions: list[list[int]], *, pad_id: int, sample_ids: Tensor
) -> dict[str, Tensor]:
    """Rows prompt + completion, right-padded; loss_mask on the completion's tokens only (module docstring)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    width = max(width, 2)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((len(prompts), width - 1), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.int64)
        loss_mask[i, len(p) - 1 : len(p) - 1 + len(c)] = True
    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "sample_ids": sample_ids,
        "sample_hash": torch.tensor([sample_hash(p + c) for p, c in zip(prompts, completions, strict=True)]),
        "prompt_len": torch.tensor([len(p) for p in prompts], dtype=torch.int64),
    }


def next_tokens(
    logits: Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """(B, V) logits -> (B,) ids: greedy at temperature 0, else a draw from softmax(logits / T) cut to the
    smallest set of ids holding top_p of the mass (the most likely id always kept)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Continue each prompt with the model (a plain, unsharded causal LM), KV cache on: one forward over the
    left-padded prompts, then one token per forward. Each completion ends at its first EOS (kept) or after
    max_new_tokens. `vocab_limit`: ids >= it (a padded vocabulary's) are never drawn."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    attn = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.int64)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps: list[Tensor] = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1, :vocab_limit]
        tok = next_tokens(logits, temperature=temperature, top_p=top_p, generator=generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        steps.append(tok)
        done = done | (tok == eos_id)
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=tok[:, None],
            attention_mask=attn,
            position_ids=pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    new = torch.stack(steps, dim=1).cpu().tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in new]
