"""The offline teacher cache (`asymkd cache write` / `teacher.cache`) against a real teacher server.

Training from a cache must give the per-step losses of training against the server itself (same rows, same
answers), also past the end of an epoch and with a smaller top_k than the cache holds (the rest folded into
the tail); a cache written for other rows or another temperature is refused before the first step.
"""

from __future__ import annotations

import json

import pytest

from asymkd.cli import cache as cache_main
from asymkd.cli import train as train_main

CACHE_K = 8


def docs() -> list[str]:
    import argparse
    import json as json_mod
    import logging
    import threading

    return [m.__doc__ or "" for m in (argparse, json_mod, logging, threading)]


@pytest.fixture(scope="module")
def teacher(one_thread_teacher):
    return one_thread_teacher


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs()))
    return path


def flags(corpus, student_dir, *, seq_len: int = 32, top_k: int = CACHE_K, extra: tuple = ()) -> list[str]:
    out = ["--model.path", str(student_dir), "--data.paths", f"[{corpus}]", "--data.seq_len", str(seq_len)]
    out += ["--optim.micro_batch_size", "2", "--optim.grad_accum_steps", "2", "--optim.lr", "3e-3"]
    out += ["--distill.top_k", str(top_k), "--distill.ce_weight", "0.5", "--checkpoint.export", "false"]
    return out + list(extra)


@pytest.fixture(scope="module")
def cache_dir(teacher, corpus, tiny_student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    argv = ["write", "--out", str(out), "--shard-rows", "5", "--teacher.targets", f"[{teacher.address}]"]
    assert cache_main(argv + flags(corpus, tiny_student_dir)) == 0
    return out


def train(out, argv: list[str], steps: int) -> tuple[int, list[dict]]:
    rc = train_main([*argv, "--run.steps", str(steps), "--run.out_dir", str(out)])
    if rc != 0:
        return rc, []
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rc, [r for r in records if r["kind"] == "train"]


def assert_same_steps(served: list[dict], cached: list[dict], rel: float) -> None:
    assert [r["step"] for r in cached] == [r["step"] for r in served] and served
    for s, c in zip(served, cached, strict=True):
        assert c["sample_ids"] == s["sample_ids"]
        for key in ("loss", "kd", "ce", "teacher_mass"):
            assert c[key] == pytest.approx(s[key], rel=rel, abs=1e-6), (s["step"], key)


def test_manifest_describes_every_row(cache_dir, capsys):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["top_k"] == CACHE_K and manifest["rows"] >= 8
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["rows"] and len(manifest["shards"]) > 1
    assert cache_main(["info", str(cache_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == manifest["rows"]


@pytest.mark.parametrize("top_k", [CACHE_K, 3])
def test_training_from_the_cache_gives_the_served_losses_across_epochs(
    teacher, cache_dir, corpus, tiny_student_dir, tmp_path, monkeypatch, top_k
):
    """Past one epoch (sample ids wrap around the rows), and with top_k below the cache's k."""
    monkeypatch.setenv("ASYMKD_CACHE", str(tmp_path / "packs"))
    rows = json.loads((cache_dir / "manifest.json").read_text())["rows"]
    steps = rows // 4 + 2  # 4 rows per step: the last steps are in the second epoch
    base = flags(corpus, tiny_student_dir, top_k=top_k)
    rc, served = train(tmp_path / "served", [*base, "--teacher.targets", f"[{teacher.address}]"], steps)
    assert rc == 0
    rc, cached = train(tmp_path / "cached", [*base, "--teacher.cache", str(cache_dir)], steps)
    assert rc == 0
    assert max(max(r["sample_ids"]) for r in cached) >= rows  # the second epoch was trained on
    assert_same_steps(served, cached, rel=1e-5)
    assert all(r["prefetch"] == 0 for r in cached)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.seq_len", "24"], "was written for other training rows"),
        (["--distill.temperature", "2.0"], "the cache is at T=1.0"),
        (["--distill.top_k", "16"], "the cache holds top_k=8"),
    ],
)
def test_a_cache_for_other_rows_or_settings_is_refused(
    cache_dir, corpus, tiny_student_dir, tmp_path, capsys, extra, message
):
    rc, _ = train(
        tmp_path / "run", [*flags(corpus, tiny_student_dir), *extra, "--teacher.cache", str(cache_dir)], 1
    )
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cache_write_needs_a_teacher_and_a_folder(corpus, tiny_student_dir, tmp_path, capsys):
    assert cache_main(["write", "--out", str(tmp_path / "c"), *flags(corpus, tiny_student_dir)]) == 2
    assert "teacher.targets" in capsys.readouterr().err
    assert cache_main(["write", *flags(corpus, tiny_student_dir)]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert cache_main(["info", str(tmp_path)]) == 2
    assert "is not a teacher cache" in capsys.readouterr().err
    assert cache_main(["read", str(tmp_path)]) == 2
    assert "unknown command 'read'" in capsys.readouterr().err
