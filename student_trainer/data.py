"""Training data: local files → tokenized documents → packed rows → deterministic, resumable, sharded batches.

    python -m student_trainer.data stdlib-docs          # write the builtin demo corpus once; print its path

Files are read with `datasets` from local paths only (text / JSON lines / parquet, never a hub). Each document
is tokenized with the student's tokenizer and followed by EOS; documents are concatenated and cut into rows of
exactly `seq_len` tokens (the last row is padded with EOS and masked). Per micro-batch a rank gets:

    input_ids  (B, T)    int64
    loss_mask  (B, T-1)  bool   row t predicts input_ids[:, t+1]; False for prompt tokens, padding, and the
                                first token of a document (never predicted across a document boundary)
    sample_ids (B,)      int64  epoch × num_rows + packed-row index: unique over the whole run

Order: rows are permuted per epoch from the seed; micro-batch i on rank r takes positions (i·B + j)·W + r
(j < B) of that stream, so ranks read disjoint rows covering each epoch, and `batches(start=i)` reproduces
the exact continuation after a restart. Packs are cached under $ASYMKD_CACHE/packs keyed by the files, the
tokenizer hash and seq_len. Attention still crosses document boundaries inside a row (plain causal mask);
only the loss respects them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from asymkd.contract import tokenizer_hash
from asymkd.paths import cache_dir
from student_trainer.config import DataSection

log = logging.getLogger("asymkd.student")

_EXT_LOADER = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
    ".jsonl": "json",
    ".json": "json",
}
_EXT_LOADER[".parquet"] = "parquet"
_FORMAT_LOADER = {"text": "text", "jsonl": "json", "parquet": "parquet"}
_PACK_VERSION = 1
Document = tuple[str, str]  # (prompt, completion); plain documents have prompt ""


# ------------------------------------------------------------------------------------------ builtin corpus
def stdlib_docs_corpus() -> Path:
    """Docstrings (≥ 120 chars) of Python's standard library as JSONL {"text": ...}; written once, ~1 MB."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = cache_dir() / "corpora" / f"stdlib-docs-py{version}.jsonl"
    if out.exists():
        return out
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [json.dumps({"text": doc}) for path in _stdlib_sources(stdlib) for doc in _docstrings(path)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(out)  # atomic: concurrent ranks/processes never read half a file
    log.info("wrote builtin corpus %s (%d documents)", out, len(lines))
    return out


def _stdlib_sources(stdlib: Path) -> list[Path]:
    files: list[Path] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in ("antigravity", "this"):
            continue
        if (stdlib / f"{name}.py").exists():
            files.append(stdlib / f"{name}.py")
        elif (stdlib / name).is_dir():
            skip = {"test", "tests", "idle_test", "__pycache__"}
            files += [p for p in sorted((stdlib / name).rglob("*.py")) if not skip & set(p.parts)]
    return files


def _docstrings(path: Path, min_chars: int = 120) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))
    return [d for d in docs if d and len(d) >= min_chars]


BUILTINS = {"stdlib-docs": stdlib_docs_corpus}


# ------------------------------------------------------------------------------------------------- reading
def resolve_files(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to their supported files (sorted); missing paths raise."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _EXT_LOADER)
            if not found:
                raise FileNotFoundError(f"data folder {p} holds no {sorted(_EXT_LOADER)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data path {p} does not exist")
    return files


def _loader(path: Path, fmt: str) -> str:
    if fmt in _FORMAT_LOADER:
        return _FORMAT_LOADER[fmt]
    if path.suffix not in _EXT_LOADER:
        raise ValueError(f"cannot tell the format of {path} from its extension; set data.format")
    return _EXT_LOADER[path.suffix]


def read_documents(files: list[Path], data: DataSection, tokenizer: Any) -> list[Document]:
    """Load records with `datasets` (grouped by loader, files in order) and turn them into documents."""
    import datasets

    datasets.disable_progress_bars()
    by_loader: dict[str, list[str]] = {}
    for f in files:
        by_loader.setdefault(_loader(f, data.format), []).append(str(f))
    docs: list[Document] = []
    for loader, group in sorted(by_loader.items()):
        kwargs = {"sample_by": data.text_sample_by} if loader == "text" else {}
        ds = datasets.load_dataset(
            loader, data_files=group, split="train", cache_dir=str(cache_dir() / "hf-datasets"), **kwargs
        )
        docs += [_document(rec, loader, data, tokenizer) for rec in ds]
    return [d for d in docs if d[1].strip()]


def _document(rec: dict, loader: str, data: DataSection, tokenizer: Any) -> Document:
    if data.format == "prompt_completion":
        return str(rec["prompt"]), str(rec["completion"])
    if data.format == "messages":
        msgs = rec["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise ValueError("data.format=messages: every record must end with an assistant message")
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("data.format=messages: the chat template does not render the prompt as a prefix")
        return prompt, full[len(prompt) :]
    field = "text" if loader == "text" else data.text_field
    if field not in rec:
        raise KeyError(f"data.text_field={field!r} is not in the records of {loader} files: {sorted(rec)}")
    return "", str(rec[field])


# ------------------------------------------------------------------------------------------------- packing
@dataclass
class PackedRows:
    tokens: np.ndarray  # (N, T) int32
    mask: np.ndarray  # (N, T-1) bool

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_documents(docs: list[Document], tokenizer: Any, batch: int = 512) -> list[tuple[list[int], int]]:
    """→ (token ids ending in EOS, number of leading prompt tokens) per document."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the student tokenizer has no eos_token: documents cannot be separated")
    out = []
    for i in range(0, len(docs), batch):
        chunk = docs[i : i + batch]
        prompts = tokenizer([p for p, _ in chunk], add_special_tokens=False)["input_ids"]
        completions = tokenizer([c for _, c in chunk], add_special_tokens=False)["input_ids"]
        for p, c in zip(prompts, completions, strict=True):
            ids = p + c
            out.append((ids if ids and ids[-1] == eos else [*ids, eos], len(p)))
    return out


def pack(token_docs: list[tuple[list[int], int]], seq_len: int, pad_id: int) -> PackedRows:
    """Concatenate documents and cut rows of `seq_len`; mask prompts, padding and document starts."""
    if not token_docs:
        raise ValueError("no documents to pack")
    tokens = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in token_docs])
    target = np.ones(len(tokens), dtype=bool)  # may token i be a training target?
    start = 0
    for ids, n_prompt in token_docs:
        target[start : start + max(n_prompt, 1)] = False  # the prompt, or at least the document's first token
        start += len(ids)
    n_rows = -(-len(tokens) // seq_len)
    pad = n_rows * seq_len - len(tokens)
    tokens = np.concatenate([tokens, np.full(pad, pad_id, dtype=np.int64)]).reshape(n_rows, seq_len)
    target = np.concatenate([target, np.zeros(pad, dtype=bool)]).reshape(n_rows, seq_len)
    return PackedRows(tokens.astype(np.int32), target[:, 1:].copy())


def split_documents(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """A fixed (seed-independent) held-out share of documents: (train, eval)."""
    if len(docs) < 2:
        raise ValueError(f"data.eval_fraction={fraction} needs at least 2 documents, got {len(docs)}")
    n_eval = min(max(1, round(fraction * len(docs))), len(docs) - 1)
    held = set(np.random.default_rng(1234).permutation(len(docs))[:n_eval].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


# ------------------------------------------------------------------------------------------------- batches
class EpochOrder:
    """Which items micro-batch `index` of a rank holds: each epoch a seeded permutation of the n items (or
    0..n-1 without shuffle), dealt round-robin over ranks, `batch_size` per micro-batch, epochs following each
    other; a function of `index` alone, so a resumed run continues the same order. Packed rows and prompts
    (rollout.PromptDataset) are ordered alike."""

    def __init__(self, n: int, *, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self._perm: dict[int, np.ndarray] = {}  # the last epoch's permutation

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm[epoch]

    def pick(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, items) of micro-batch `index`, each (batch_size,) int64; sample id = epoch × n + item."""
        positions = (index * self.batch_size + np.arange(self.batch_size)) * self.world_size + self.rank
        epochs, offsets = np.divmod(positions, self.n)
        items = np.array(
            [self._order(int(e))[o] for e, o in zip(epochs, offsets, strict=True)], dtype=np.int64
        )
        return epochs, items


class PackedDataset:
    """Packed rows served as micro-batches of `micro_batch_size` rows for one rank (see module docstring)."""

    def __init__(
        self,
        rows: PackedRows,
        *,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.rows, self.batch_size, self.rank, self.world_size = rows, micro_batch_size, rank, world_size
        self.order = EpochOrder(
            len(rows),
            batch_size=micro_batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=shuffle,
        )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def micro_batches_per_epoch(self) -> float:
        return len(self.rows) / (self.batch_size * self.world_size)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch `index` (counted from the start of the run) for this rank."""
        epochs, rows = self.order.pick(index)
        return {
            "input_ids": torch.from_numpy(self.rows.tokens[rows].astype(np.int64)),
            "loss_mask": torch.from_numpy(self.rows.mask[rows]),
            "sample_ids": torch.from_numpy(epochs * len(self.rows) + rows),
        }

    def batches(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches `start`, `start + 1`, ... forever (epochs follow each other)."""
        index = start
        while True:
            yield self.batch(index)
            index += 1


# ------------------------------------------------------------------------------------------- build + cache
def _pack_key(files: list[Path], eval_files: list[Path], data: DataSection, tok_id: str) -> str:
    stat = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    stat_eval = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in eval_files]
    spec = [_PACK_VERSION, stat, stat_eval, data.format, data.text_field, data.text_sample_by, data.seq_len]
    spec += [data.eval_fraction, tok_id] + ([data.max_documents] if data.max_documents else [])
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:20]


def _train_eval_documents(
    files: list[Path], eval_files: list[Path], data: DataSection, tokenizer: Any
) -> tuple[list[Document], list[Document]]:
    docs = read_documents(files, data, tokenizer)
    eval_docs: list[Document] = []
    if data.eval_fraction > 0:
        docs, eval_docs = split_documents(docs, data.eval_fraction)
    elif eval_files:
        eval_docs = read_documents(eval_files, data, tokenizer)
    if data.max_documents:
        docs = docs[: data.max_documents]
    return docs, eval_docs


def load_prompt_documents(data: DataSection, tokenizer: Any, *, rank: int = 0) -> list[tuple[list[int], int]]:
    """The training documents unpacked, one per prompt, in file order: (token ids ending in EOS, number of
    prompt tokens), the same documents (held-out split, max_documents) the packs are made of. On-policy
    batches (student_trainer/rollout.py) are built from these prompts."""
    distributed = dist.is_available() and dist.is_initialized()
    if data.builtin and rank == 0:
        BUILTINS[data.builtin]()
    if distributed:  # rank 0 fills the datasets cache first
        dist.barrier()
    files = [BUILTINS[data.builtin]()] if data.builtin else resolve_files(data.paths)
    eval_files = resolve_files(data.eval_path) if data.eval_path else []
    docs, _ = _train_eval_documents(files, eval_files, data, tokenizer)
    return tokenize_documents(docs, tokenizer)


def _build_packs(
    files: list[Path], eval_files: list[Path], data: DataSection, tokenizer: Any
) -> dict[str, PackedRows]:
    docs, eval_docs = _train_eval_documents(files, eval_files, data, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packs = {"train": pack(tokenize_documents(docs, tokenizer), data.seq_len, pad)}
    if eval_docs:
        packs["eval"] = pack(tokenize_documents(eval_docs, tokenizer), data.seq_len, pad)
    return packs


def _save_packs(packs: dict[str, PackedRows], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{k}_{a}": getattr(v, a) for k, v in packs.items() for a in ("tokens", "mask")}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.rename(path)


def _load_packs(path: Path) -> dict[str, PackedRows]:
    with np.load(path) as z:
        return {
            k: PackedRows(z[f"{k}_tokens"], z[f"{k}_mask"]) for k in ("train", "eval") if f"{k}_tokens" in z
        }


def tokenizer_id(tokenizer_dir: str | Path) -> str:
    """What keys a pack in the cache: the tokenizer's fingerprint (its folder if it has no tokenizer.json)."""
    return tokenizer_hash(tokenizer_dir) or str(Path(tokenizer_dir).resolve())


def load_packs(
    data: DataSection, tokenizer: Any, tokenizer_id: str, *, rank: int = 0
) -> dict[str, PackedRows]:
    """{"train": rows, "eval": rows (if held-out data)}; rank 0 builds/caches, the other ranks wait and read."""
    distributed = dist.is_available() and dist.is_initialized()
    if data.builtin and rank == 0:
        BUILTINS[data.builtin]()
    if distributed:
        dist.barrier()
    files = [BUILTINS[data.builtin]()] if data.builtin else resolve_files(data.paths)
    eval_files = resolve_files(data.eval_path) if data.eval_path else []
    if not data.cache:
        return _build_packs(files, eval_files, data, tokenizer)
    path = cache_dir() / "packs" / f"{_pack_key(files, eval_files, data, tokenizer_id)}.npz"
    if rank == 0 and not path.exists():
        log.info("tokenizing and packing %d files -> %s", len(files) + len(eval_files), path)
        _save_packs(_build_packs(files, eval_files, data, tokenizer), path)
    if distributed:
        dist.barrier()
    return _load_packs(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in BUILTINS:
        print(f"usage: python -m student_trainer.data {{{','.join(BUILTINS)}}}", file=sys.stderr)
        return 2
    print(BUILTINS[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
