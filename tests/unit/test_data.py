"""Data: packing masks document starts, prompts and padding; order is seeded, resumable and rank-sharded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from student_trainer import data as data_mod
from student_trainer.config import DataSection
from student_trainer.data import (
    PackedDataset,
    PackedRows,
    load_packs,
    pack,
    read_documents,
    tokenize_documents,
)

EOS = 0


def test_pack_masks_document_starts_and_padding():
    docs = [([11, 12, 13, EOS], 0), ([21, 22, EOS], 0)]  # 7 tokens -> 2 rows of 4, last padded with 1 token
    rows = pack(docs, seq_len=4, pad_id=EOS)
    assert rows.tokens.tolist() == [[11, 12, 13, EOS], [21, 22, EOS, EOS]]
    # row t predicts token t+1; 21 starts a new document (first token of row 1: never predicted anyway),
    # the trailing EOS of row 1 is padding.
    assert rows.mask.tolist() == [[True, True, True], [True, True, False]]
    rows = pack(docs, seq_len=8, pad_id=EOS)
    assert rows.tokens.tolist() == [[11, 12, 13, EOS, 21, 22, EOS, EOS]]
    # the row predicting 21 from the previous document's EOS is masked: no target crosses a boundary
    assert rows.mask.tolist() == [[True, True, True, False, True, True, False]]


def test_pack_masks_prompts():
    rows = pack([([1, 2, 3, 4, EOS], 2), ([5, 6, EOS], 1)], seq_len=8, pad_id=EOS)
    # targets: 3, 4, EOS of doc 1 (prompt 1, 2 excluded); 6, EOS of doc 2 (prompt 5 excluded)
    targets = [tok for tok, m in zip(rows.tokens[0, 1:], rows.mask[0], strict=True) if m]
    assert targets == [3, 4, EOS, 6, EOS]


def _tok(tiny_student_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_student_dir)


def test_prompt_completion_file_masks_the_prompt(tiny_student_dir, tmp_path):
    tok = _tok(tiny_student_dir)
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "def add(a, b):", "completion": " return a + b"}) + "\n")
    section = DataSection(paths=[str(path)], format="prompt_completion", seq_len=64)
    docs = read_documents([path], section, tok)
    ((ids, n_prompt),) = tokenize_documents(docs, tok)
    rows = pack([(ids, n_prompt)], seq_len=64, pad_id=tok.eos_token_id)
    targets = rows.tokens[0, 1:][rows.mask[0]].tolist()
    assert targets == tok(" return a + b", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_messages_train_only_the_last_assistant_turn(tiny_student_dir, tmp_path):
    tok = _tok(tiny_student_dir)
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "name a list method"}, {"role": "assistant", "content": "append"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    docs = read_documents([path], DataSection(paths=[str(path)], format="messages"), tok)
    assert docs == [("<user>name a list method\n<assistant>", "append\n")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": msgs[:1]}) + "\n")
    with pytest.raises(ValueError, match="end with an assistant message"):
        read_documents([bad], DataSection(paths=[str(bad)], format="messages"), tok)


def _rows(n: int, seq_len: int = 4) -> PackedRows:
    tokens = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
    return PackedRows(tokens, np.ones((n, seq_len - 1), dtype=bool))


def test_order_is_seeded_and_resumable():
    a = PackedDataset(_rows(10), micro_batch_size=3, seed=7)
    stream = [b["sample_ids"].tolist() for b, _ in zip(a.batches(), range(9), strict=False)]
    again = [b["sample_ids"].tolist() for b, _ in zip(a.batches(), range(9), strict=False)]
    assert stream == again
    resumed = PackedDataset(_rows(10), micro_batch_size=3, seed=7).batches(start=5)
    assert [next(resumed)["sample_ids"].tolist() for _ in range(4)] == stream[5:]
    other = PackedDataset(_rows(10), micro_batch_size=3, seed=8)
    assert [other.batch(i)["sample_ids"].tolist() for i in range(3)] != stream[:3]
    # epochs follow each other with a fresh permutation; ids stay unique over the run
    flat = [i for ids in stream for i in ids]
    assert len(set(flat)) == len(flat) and set(i % 10 for i in flat[:10]) == set(range(10))


def test_ranks_read_disjoint_rows_covering_each_epoch():
    n, world, b = 24, 3, 2
    seen = []
    for rank in range(world):
        ds = PackedDataset(_rows(n), micro_batch_size=b, rank=rank, world_size=world, seed=3)
        for i in range(n // (world * b)):  # one epoch
            batch = ds.batch(i)
            assert batch["input_ids"].shape == (b, 4) and batch["input_ids"].dtype == torch.int64
            assert batch["loss_mask"].shape == (b, 3) and batch["loss_mask"].dtype == torch.bool
            # input_ids are the rows named by sample_ids
            assert batch["input_ids"][:, 0].tolist() == [4 * (s % n) for s in batch["sample_ids"].tolist()]
            seen += batch["sample_ids"].tolist()
    assert sorted(seen) == list(range(n))


def test_load_packs_caches_and_splits_held_out_documents(tiny_student_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMKD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "docs").mkdir()
    corpus = tmp_path / "docs" / "corpus.txt"
    corpus.write_text("\n\n".join(f"document number {i} says hello to the world." for i in range(20)))
    tok = _tok(tiny_student_dir)
    section = DataSection(paths=[str(tmp_path / "docs")], seq_len=16, eval_fraction=0.2)
    packs = load_packs(section, tok, "tok-a")
    assert set(packs) == {"train", "eval"}
    cached = list((tmp_path / "cache" / "packs").glob("*.npz"))
    assert len(cached) == 1
    again = load_packs(section, tok, "tok-a")
    assert all(np.array_equal(packs[k].tokens, again[k].tokens) for k in packs)
    load_packs(section, tok, "tok-b")  # another tokenizer: another pack
    assert len(list((tmp_path / "cache" / "packs").glob("*.npz"))) == 2
    # 20 paragraphs (documents) -> 4 held out, none of them in the training rows
    numbers = {k: set(re.findall(r"number (\d+)", tok.decode(packs[k].tokens.ravel()))) for k in packs}
    assert (
        len(numbers["eval"]) == 4 and len(numbers["train"]) == 16 and not numbers["eval"] & numbers["train"]
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_packs(DataSection(paths=[str(tmp_path / "nope.txt")]), tok, "tok-a")


def test_max_documents_keeps_the_first_training_documents_and_the_same_held_out_set(
    tiny_student_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("ASYMKD_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document number {i} says hello to the world." for i in range(20)))
    tok = _tok(tiny_student_dir)
    full = load_packs(DataSection(paths=[str(corpus)], seq_len=16, eval_fraction=0.2), tok, "t")
    few = load_packs(
        DataSection(paths=[str(corpus)], seq_len=16, eval_fraction=0.2, max_documents=5), tok, "t"
    )
    numbers = {k: re.findall(r"number (\d+)", tok.decode(v.tokens.ravel())) for k, v in full.items()}
    kept = list(dict.fromkeys(re.findall(r"number (\d+)", tok.decode(few["train"].tokens.ravel()))))
    assert kept == list(dict.fromkeys(numbers["train"]))[:5]  # the first five, in order
    assert np.array_equal(few["eval"].tokens, full["eval"].tokens)


def test_builtin_corpus_sources_are_stdlib_docstrings():
    import json as json_module
    import sysconfig

    files = data_mod._stdlib_sources(Path(sysconfig.get_paths()["stdlib"]))
    assert any(f.name == "__init__.py" and f.parent.name == "json" for f in files)
    assert not any("test" in f.parts for f in files)
    docs = data_mod._docstrings(Path(json_module.__file__))
    assert docs and all(len(d) >= 120 for d in docs) and any("JSON" in d for d in docs)
