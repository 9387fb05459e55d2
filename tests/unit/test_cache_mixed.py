"""Mixed mode's plumbing (student_trainer/sources/cache.py): one pass over the data for the training loop and
the live source, which gets exactly the rows the cache lacks, in data order, at most _LOOKAHEAD batches ahead;
cached and live answers merged row by row. No teacher, no files: the two readers are a thread and this test."""

from __future__ import annotations

import threading
import time

import torch

from student_trainer.sources import cache as mixed
from student_trainer.sources.base import TeacherBatch


def batches(n: int, b: int = 3):
    for i in range(n):
        yield {"sample_ids": torch.arange(i * b, (i + 1) * b), "input_ids": torch.full((b, 4), i)}


def test_the_live_source_gets_the_missing_rows_of_each_batch_in_order_and_once():
    missing = lambda batch: batch["sample_ids"] % 4 == 0  # noqa: E731  rows 0, 4, 8, ...: not cached
    split = mixed._Split(batches(20), missing)
    live: list[dict] = []
    reader = threading.Thread(target=lambda: live.extend(split.live_batches()))
    reader.start()
    main = []
    while (item := split.next_main()) is not None:
        main.append(item)
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert [int(b["input_ids"][0, 0]) for b, _ in main] == list(range(20))  # every batch, in order
    want = [i for i in range(60) if i % 4 == 0]
    assert torch.cat([b["sample_ids"] for b in live]).tolist() == want  # the missing rows, once, in order
    assert all(bool(m.any()) == any(int(s) % 4 == 0 for s in b["sample_ids"]) for b, m in main)


def test_the_live_source_reads_at_most_lookahead_batches_ahead():
    read = []

    def data():
        for b in batches(mixed._LOOKAHEAD * 3):
            read.append(1)
            yield b

    split = mixed._Split(data(), lambda batch: torch.zeros(3, dtype=torch.bool))  # everything cached
    live: list[dict] = []
    reader = threading.Thread(target=lambda: live.extend(split.live_batches()))
    reader.start()
    deadline = time.monotonic() + 5
    while len(read) < mixed._LOOKAHEAD and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert len(read) == mixed._LOOKAHEAD  # then it waits for the training loop
    assert sum(1 for _ in iter(split.next_main, None)) == mixed._LOOKAHEAD * 3
    reader.join(timeout=10)
    assert not reader.is_alive() and live == []


def test_close_releases_a_waiting_live_source():
    split = mixed._Split(batches(mixed._LOOKAHEAD * 2), lambda batch: torch.zeros(3, dtype=torch.bool))
    reader = threading.Thread(target=lambda: list(split.live_batches()))
    reader.start()
    time.sleep(0.1)
    split.close()
    reader.join(timeout=5)
    assert not reader.is_alive()


def test_merge_takes_each_row_from_its_source():
    def answer(value: float, rows: int) -> TeacherBatch:
        return TeacherBatch(
            valid=torch.ones(rows, 2, dtype=torch.bool), ids=torch.full((rows, 2, 3), int(value)),
            logprobs=torch.full((rows, 2, 3), value), tail_logprob=torch.full((rows, 2), value),
            target_logprob=None,
        )  # fmt: skip

    from_live = torch.tensor([True, False, False, True])
    out = mixed._merge(answer(1.0, 2), answer(2.0, 2), from_live)
    assert out.logprobs[:, 0, 0].tolist() == [2.0, 1.0, 1.0, 2.0]
    assert out.ids[:, 1, 2].tolist() == [2, 1, 1, 2] and out.tail_logprob.shape == (4, 2)
    assert out.target_logprob is None  # one side lacks it: the merged batch has none
