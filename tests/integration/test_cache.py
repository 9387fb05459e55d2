"""The offline teacher cache (`asymkd cache write` / `teacher.cache`) against a real teacher server.

Written answers read back equal the live teacher's (lossless encodings) or within the codec's bound (the
tail exact); training from a cache gives the per-step losses of training against the server itself, also
past the end of an epoch, with a smaller top_k, from a format-1 cache, on two torchrun ranks, and in mixed
mode (half the rows cached, the rest scored live, optionally appended); a write killed mid-way and run again
gives the shards of an uninterrupted one, byte for byte; a cache for other rows, settings, tokenizer or
teacher is refused before the first step, naming why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from asymkd.cli import cache as cache_main
from asymkd.cli import train as train_main
from student_trainer.cache import CacheStore

CACHE_K = 8
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


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


def flags(corpus, student_dir, *, seq_len: int = 32, top_k: int | None = CACHE_K) -> list[str]:
    out = ["--model.path", str(student_dir), "--data.paths", f"[{corpus}]", "--data.seq_len", str(seq_len)]
    out += ["--optim.micro_batch_size", "2", "--optim.grad_accum_steps", "2", "--optim.lr", "3e-3"]
    out += ["--distill.ce_weight", "0.5", "--checkpoint.export", "false"]
    return out + (["--distill.top_k", str(top_k)] if top_k else [])


def write(out, source: list[str], base: list[str], encoding: str = "delta-fp32", shard_rows: int = 5) -> int:
    argv = ["write", "--out", str(out), "--shard-rows", str(shard_rows), "--encoding", encoding]
    return cache_main([*argv, *source, "--teacher.prefetch", "1", *base])


@pytest.fixture(scope="module")
def cache_dir(teacher, corpus, tiny_student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    assert write(out, ["--teacher.targets", f"[{teacher.address}]"], flags(corpus, tiny_student_dir)) == 0
    return out


@pytest.fixture(scope="module")
def rows(corpus, tiny_student_dir):
    from transformers import AutoTokenizer

    from student_trainer.config import DataSection
    from student_trainer.data import load_packs, tokenizer_id

    data = DataSection(paths=[str(corpus)], seq_len=32)
    return load_packs(data, AutoTokenizer.from_pretrained(tiny_student_dir), tokenizer_id(tiny_student_dir))[
        "train"
    ]


def train(out, argv: list[str], steps: int) -> tuple[int, list[dict]]:
    rc = train_main([*argv, "--run.steps", str(steps), "--run.out_dir", str(out)])
    return rc, records(out) if rc == 0 else []


def records(out) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_same_steps(served: list[dict], cached: list[dict], rel: float, keys=("loss", "kd", "ce")) -> None:
    assert [r["step"] for r in cached] == [r["step"] for r in served] and served
    for s, c in zip(served, cached, strict=True):
        assert c["sample_ids"] == s["sample_ids"]
        for key in keys:
            assert c[key] == pytest.approx(s[key], rel=rel, abs=1e-6), (s["step"], key)


@pytest.fixture(scope="module")
def served(teacher, corpus, tiny_student_dir, rows, tmp_path_factory):
    """Per-step records of training against the server, by top_k (steps reach into the second epoch)."""
    out, steps = {}, len(rows) // 4 + 2
    for k in (CACHE_K, 3):
        base = [*flags(corpus, tiny_student_dir, top_k=k), "--teacher.targets", f"[{teacher.address}]"]
        rc, out[k] = train(tmp_path_factory.mktemp("served"), base, steps)
        assert rc == 0
    return out


# ------------------------------------------------------------------------------------------ format, info
@pytest.mark.parametrize("encoding", ["delta-fp32", "packed-fp32", "delta-q4", "packed-q8"])
def test_written_answers_read_back_as_the_live_teachers(
    teacher, corpus, tiny_student_dir, rows, tmp_path, encoding, monkeypatch, capsys
):
    """Every row, through the writer's own batches (2 rows a request): ids and tail exact; values exact or within
    the codec's bound. The writer's progress line (here after every request) gives rows, tokens/s, ETA."""
    from teacher_server.client import TeacherClient

    monkeypatch.setattr("student_trainer.cache.writer._PROGRESS_S", 0.0)
    out = tmp_path / encoding
    assert (
        write(out, ["--teacher.targets", f"[{teacher.address}]"], flags(corpus, tiny_student_dir), encoding)
        == 0
    )
    cache, lossless = CacheStore(out), encoding.endswith("fp32")
    with TeacherClient([teacher.address]) as client:
        for a in range(0, len(rows), 2):
            batch = rows.tokens[a : a + 2].astype(np.int64)
            starts = [int(np.argmax(m)) if m.any() else len(m) - 1 for m in rows.mask[a : a + 2]]
            live = client.score([torch.from_numpy(t) for t in batch], top_k=CACHE_K, score_from=starts)
            for i, s in enumerate(live):
                got = cache.answers(a + i)
                if not rows.mask[a + i].any():
                    assert len(got.ids) == 0
                    continue
                order, mine = s.ids.argsort(1), np.argsort(got.ids, 1)
                assert np.array_equal(np.take_along_axis(got.ids, mine, 1), s.ids.gather(1, order).numpy())
                assert np.array_equal(got.tail, s.tail_logprob.numpy())
                want, have = s.logprobs.gather(1, order).numpy(), np.take_along_axis(got.logprobs, mine, 1)
                width = (want.max(1) - want.min(1))[:, None]
                bound = 0 if lossless else width / (15 if encoding.endswith("q4") else 255) + width / 1000
                assert (np.abs(have - want) <= bound + (0 if lossless else 1e-5)).all()
    assert f"cache write 100% | rows {len(rows)}/{len(rows)} | " in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["encoding"] == encoding
    assert all(
        oct(p.stat().st_mode & 0o777) == "0o644" for p in out.glob("shard-*")
    )  # a cache is shared data


def test_info_prints_a_summary_and_the_manifest(cache_dir, capsys):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["rows"] and len(manifest["shards"]) > 1
    assert cache_main(["info", str(cache_dir)]) == 0
    text = capsys.readouterr().out
    for needle in (f"{manifest['rows']} of {manifest['rows']} packed rows", "B/token", "delta-fp32 (lossless)",
                   "top_k 8, temperature 1.0", "(hf, float32, vocab 512)", "corpus.jsonl (seq_len 32)",
                   f"rows_sha256 {manifest['rows_sha256']}", "from teacher.targets by 1 rank"):  # fmt: skip
        assert needle in text, needle
    assert cache_main(["info", str(cache_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == info["rows_cached"] == manifest["rows"] and info["complete"]
    data = sum(p.stat().st_size for p in cache_dir.glob("*.safetensors"))  # shards + vocabulary
    assert info["bytes_per_token"] == pytest.approx(data / info["tokens"], rel=1e-3)
    assert info["bytes_on_disk"] == data + (cache_dir / "manifest.json").stat().st_size


# -------------------------------------------------------------------------------------- training from it
@pytest.mark.parametrize("top_k", [CACHE_K, 3])
def test_training_from_the_cache_gives_the_served_losses_across_epochs(
    served, cache_dir, corpus, tiny_student_dir, rows, tmp_path, top_k
):
    """Past one epoch (sample ids wrap around the rows), and with top_k below the cache's k."""
    base = flags(corpus, tiny_student_dir, top_k=top_k)
    rc, cached = train(tmp_path, [*base, "--teacher.cache", str(cache_dir)], len(served[top_k]))
    assert rc == 0
    assert max(max(r["sample_ids"]) for r in cached) >= len(rows)  # the second epoch was trained on
    assert_same_steps(served[top_k], cached, rel=1e-5)
    assert all(r["prefetch"] == 0 for r in cached)


@pytest.mark.parametrize(("encoding", "rel"), [("delta-q8", 0.005), ("delta-q4", 0.05)])
def test_training_from_a_quantized_cache_stays_near_the_served_losses(
    served, cache_dir, corpus, tiny_student_dir, tmp_path, encoding, rel
):
    """A quantized cache (re-encoded from the lossless one: teacher.cache as the writer's source): the KD loss
    of every step within `rel` of the served run's (the stated bound: 0.5% for q8, 5% for q4)."""
    base = flags(corpus, tiny_student_dir)
    assert write(tmp_path / "q", ["--teacher.cache", str(cache_dir)], base, encoding) == 0
    rc, cached = train(
        tmp_path / "run", [*base, "--teacher.cache", str(tmp_path / "q")], len(served[CACHE_K])
    )
    assert rc == 0
    assert_same_steps(served[CACHE_K], cached, rel=rel, keys=("kd",))


def test_a_format_1_cache_still_reads(served, cache_dir, corpus, tiny_student_dir, tmp_path, capsys):
    """The v1 layout (dense int32 ids + fp32 rows with a valid mask), written here as the old writer did."""
    from safetensors.torch import save_file

    v2, v1 = CacheStore(cache_dir), tmp_path / "v1"
    v1.mkdir()
    manifest, t = json.loads((cache_dir / "manifest.json").read_text()), 31
    shards = []
    for start in range(0, manifest["rows"], 7):
        dense = {"valid": [], "ids": [], "logprobs": [], "tail_logprob": [], "target_logprob": []}
        for row in range(start, min(start + 7, manifest["rows"])):
            a, first = v2.answers(row), t - len(v2.answers(row).ids)
            dense["valid"].append(torch.arange(t) >= first)
            for key, part, fill in (("ids", a.ids, 0), ("logprobs", a.logprobs, -2.0), ("tail_logprob", a.tail, 0),
                                    ("target_logprob", a.target, 0)):  # fmt: skip
                full = torch.full((t, *part.shape[1:]), fill, dtype=torch.from_numpy(part).dtype)
                full[first:] = torch.from_numpy(part)
                dense[key].append(full)
        tensors = {k: torch.stack(v) for k, v in dense.items()}
        tensors["ids"], tensors["valid"] = tensors["ids"].int(), tensors["valid"].to(torch.uint8)
        save_file(tensors, str(v1 / f"shard-{len(shards):05d}.safetensors"))
        shards.append(
            {"file": f"shard-{len(shards):05d}.safetensors", "start": start, "rows": len(dense["ids"])}
        )
    keep = ("rows", "seq_len", "rows_sha256", "tokenizer_hash", "teacher", "top_k", "temperature")
    old = {k: manifest[k] for k in keep} | {"format": "asymkd-teacher-cache/1", "shards": shards}
    (v1 / "manifest.json").write_text(json.dumps(old))
    assert cache_main(["info", str(v1)]) == 0
    assert "asymkd-teacher-cache/1, complete" in capsys.readouterr().out
    base = flags(corpus, tiny_student_dir)
    rc, cached = train(tmp_path / "run", [*base, "--teacher.cache", str(v1)], len(served[CACHE_K]))
    assert rc == 0
    assert_same_steps(served[CACHE_K], cached, rel=1e-5)


def test_sampled_answers_cache_and_train_as_served(teacher, corpus, tiny_student_dir, tmp_path, capsys):
    """SAMPLED (RS-KD): the draws, their counts and the log-probs at them, stored losslessly: a run from the
    cache gives the served run's losses; other draws (another sample_seed) are refused."""
    base = [*flags(corpus, tiny_student_dir, top_k=None), "--distill.signal", "sampled"]
    base += ["--distill.num_samples", "6"]
    assert write(tmp_path / "c", ["--teacher.targets", f"[{teacher.address}]"], base) == 0
    rc, served = train(tmp_path / "served", [*base, "--teacher.targets", f"[{teacher.address}]"], 8)
    assert rc == 0
    rc, cached = train(tmp_path / "cached", [*base, "--teacher.cache", str(tmp_path / "c")], 8)
    assert rc == 0
    assert_same_steps(served, cached, rel=1e-5)
    seed = ["--distill.sample_seed", "2", "--teacher.cache", str(tmp_path / "c")]
    assert train(tmp_path / "other", [*base, *seed], 1)[0] == 2
    assert "distill.sample_seed=2: the cache holds sample_seed=1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- mixed mode
def half_of(cache_dir, tmp_path):
    part = tmp_path / "half"
    shutil.copytree(cache_dir, part)
    for f in sorted(part.glob("shard-*"))[::2]:
        f.unlink()
    return part


def test_mixed_mode_reads_what_the_cache_holds_and_scores_the_rest_live(
    served, teacher, cache_dir, corpus, tiny_student_dir, tmp_path, capsys
):
    part, base = half_of(cache_dir, tmp_path), flags(corpus, tiny_student_dir)
    assert train(tmp_path / "alone", [*base, "--teacher.cache", str(part)], 1)[0] == 2
    held, rows = CacheStore(part).rows_cached, json.loads((part / "manifest.json").read_text())["rows"]
    assert 0 < held < rows and f"holds {held} of {rows} rows" in capsys.readouterr().err
    live = ["--teacher.targets", f"[{teacher.address}]"]  # a config listing targets: simply works
    rc, mixed = train(tmp_path / "mixed", [*base, *live, "--teacher.cache", str(part)], len(served[CACHE_K]))
    assert rc == 0
    assert_same_steps(served[CACHE_K], mixed, rel=1e-5)
    nobody = ["--teacher.targets", "[127.0.0.1:9]", "--teacher.connect_timeout_s", "1"]  # no teacher up:
    rc, cached = train(
        tmp_path / "full", [*base, *nobody, "--teacher.cache", str(cache_dir)], 2
    )  # not needed
    assert rc == 0 and cached[-1]["step"] == 2


def test_mixed_mode_appends_the_rows_scored_live(
    served, cache_dir, corpus, tiny_student_dir, tmp_teacher, tmp_path
):
    """In-process live teacher, cache_append: the cache ends complete; a cache-only run then trains the same."""
    part, base = half_of(cache_dir, tmp_path), flags(corpus, tiny_student_dir)
    live = ["--teacher.in_process", str(tmp_teacher), "--teacher.cache_append", "true"]
    steps = len(served[CACHE_K])
    rc, mixed = train(tmp_path / "mixed", [*base, *live, "--teacher.cache", str(part)], steps)
    assert rc == 0
    assert_same_steps(served[CACHE_K], mixed, rel=1e-5)
    assert CacheStore(part).rows_cached == json.loads((part / "manifest.json").read_text())["rows"]
    assert list(part.glob("shard-a*-r0-0000.safetensors"))
    rc, cached = train(tmp_path / "cached", [*base, "--teacher.cache", str(part)], steps)
    assert rc == 0
    assert_same_steps(served[CACHE_K], cached, rel=1e-5)


@pytest.fixture(scope="module")
def tmp_teacher(tiny_teacher_dir):
    return tiny_teacher_dir


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.seq_len", "24"], "was written for other training rows"),
        (["--distill.temperature", "2.0"], "the cache is at T=1.0"),
        (["--distill.top_k", "16"], "the cache holds signal 'top_k' top_k=8"),
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


def test_a_cache_of_another_tokenizer_or_teacher_is_refused(
    cache_dir, corpus, tiny_student_dir, tmp_path, capsys
):
    other_tok = tmp_path / "student"  # tokenizes alike (same rows), but another tokenizer by its hash
    shutil.copytree(tiny_student_dir, other_tok)
    spec = json.loads((other_tok / "tokenizer.json").read_text())
    spec["decoder"]["trim_offsets"] = not spec["decoder"]["trim_offsets"]
    (other_tok / "tokenizer.json").write_text(json.dumps(spec))
    rc, _ = train(tmp_path / "a", [*flags(corpus, other_tok), "--teacher.cache", str(cache_dir)], 1)
    assert rc == 2 and "tokenizer hash" in capsys.readouterr().err
    # Same tokenizer, another model, scoring the rows a half cache lacks (a complete cache starts no teacher).
    other_teacher = ["--teacher.in_process", str(tiny_student_dir)]
    part = half_of(cache_dir, tmp_path)
    rc, _ = train(
        tmp_path / "b", [*flags(corpus, tiny_student_dir), *other_teacher, "--teacher.cache", str(part)], 1
    )
    assert rc == 2 and "was written by another teacher than the live one" in capsys.readouterr().err


def test_cache_write_needs_a_teacher_and_a_folder(corpus, tiny_student_dir, tmp_path, capsys):
    assert cache_main(["write", "--out", str(tmp_path / "c"), *flags(corpus, tiny_student_dir)]) == 2
    assert "teacher.targets, teacher.in_process or teacher.cache" in capsys.readouterr().err
    assert cache_main(["write", *flags(corpus, tiny_student_dir)]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert (
        cache_main(["write", "--out", "x", "--encoding", "delta-q2", *flags(corpus, tiny_student_dir)]) == 2
    )
    assert "encoding" in capsys.readouterr().err
    assert cache_main(["info", str(tmp_path)]) == 2
    assert "is not a teacher cache" in capsys.readouterr().err
    assert cache_main(["read", str(tmp_path)]) == 2
    assert "unknown command 'read'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ several ranks, resuming
def command(*args: str, ranks: int = 1) -> list[str]:
    run = ["-m", "asymkd.torchrun", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    return [sys.executable, *run, "-m", "asymkd.cli", *args]


@pytest.fixture(scope="module")
def two_rank_cache(corpus, tiny_student_dir, tiny_teacher_dir, tmp_path_factory):
    """A 2-rank write with the in-process teacher: each rank scores and writes every other shard."""
    out = tmp_path_factory.mktemp("two") / "c"
    argv = ["cache", "write", "--out", str(out), "--shard-rows", "8", "--encoding", "delta-q8"]
    argv += ["--teacher.in_process", str(tiny_teacher_dir), *flags(corpus, tiny_student_dir)]
    argv += ["--optim.micro_batch_size", "4"]
    done = subprocess.run(
        command(*argv, ranks=2), env=ONE_THREAD, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, argv


@pytest.mark.slow
def test_two_ranks_train_from_a_two_rank_cache_as_from_the_live_teacher(
    two_rank_cache, teacher, corpus, tiny_student_dir, tmp_path
):
    cache, _ = two_rank_cache
    base = ["train", *flags(corpus, tiny_student_dir), "--run.steps", "6", "--optim.micro_batch_size", "1"]
    runs = {}
    for name, source in (("cached", ["--teacher.cache", str(cache)]),
                         ("live", ["--teacher.targets", f"[{teacher.address}]"])):  # fmt: skip
        argv = [*base, *source, "--run.out_dir", str(tmp_path / name)]
        done = subprocess.run(
            command(*argv, ranks=2), env=ONE_THREAD, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = records(tmp_path / name)
    assert_same_steps(runs["live"], runs["cached"], rel=0.005, keys=("kd",))  # q8: the stated 0.5%


@pytest.fixture(scope="module")
def slow_teacher(tiny_teacher_dir, tmp_path_factory):
    """The tiny teacher holding every request 150 ms (the batcher's wait): a write long enough to kill."""
    from teacher_server.launch import LocalTeacher

    args = ["--model", str(tiny_teacher_dir), "--backend", "hf", "--max-top-k", "64", "--max-wait-ms", "150"]
    with LocalTeacher(
        args, log_path=tmp_path_factory.mktemp("logs") / "slow.log", env={"OMP_NUM_THREADS": "1"}
    ) as t:
        yield t


def wait_for(path_glob, proc, count: int = 1, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(path_glob())) < count:
        assert proc.poll() is None and time.monotonic() < deadline, "the write ended or stalled"
        time.sleep(0.01)


@pytest.mark.slow
def test_an_interrupted_write_resumes_to_the_same_shards(two_rank_cache, slow_teacher, tmp_path):
    """SIGTERM, then SIGKILL, mid-write; the same command (one rank, served teacher) each time: the shards
    equal, byte for byte, those of the uninterrupted 2-rank write."""
    reference, argv = two_rank_cache
    out = tmp_path / "c"
    i = argv.index("--teacher.in_process")
    argv = [*argv[:i], "--teacher.targets", f"[{slow_teacher.address}]", *argv[i + 2 :]]
    argv[argv.index("--out") + 1] = str(out)
    shards = lambda: out.glob("shard-*.safetensors")  # noqa: E731
    proc = subprocess.Popen(command(*argv), env=ONE_THREAD, stderr=subprocess.PIPE, text=True)
    wait_for(shards, proc, 1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "the same command continues" in err
    total = len(list(reference.glob("shard-*")))
    first = len(list(shards()))
    assert first < total and not (out / "manifest.json").read_text().count('"complete": true')
    proc = subprocess.Popen(command(*argv), env=ONE_THREAD, stderr=subprocess.PIPE, text=True)
    wait_for(shards, proc, first + 1)
    proc.kill()
    proc.communicate(timeout=60)
    done = subprocess.run(command(*argv), env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resuming the write" in done.stderr, done.stderr[-2000:]
    names = sorted(p.name for p in reference.glob("shard-*"))
    assert sorted(p.name for p in out.glob("shard-*")) == names and not list(out.glob(".*"))
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
