"""Helpers shared by the benchmarks in bench/ (not part of the asymkd package).

- `machine_info()`: what ran the benchmark (CPU, cores, memory, load average, versions), stored in every JSON.
- `build_model()`: a random-init Llama (SmolLM2 tokenizer) built once per folder; `count_params()`.
- `ProcessTreePeak`: peak RSS (VmHWM) of a process and its descendants, for servers we start.
- `summarize()`: median/min/max of repeated measurements; `fmt_summary()`, `fmt_gib()`; `write_json()`;
  `save_figure()`; `cache_root()`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


# ------------------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return getattr(mod, "__version__", "?")


def machine_info(extra_versions: dict[str, str | None] | None = None) -> dict:
    """CPU model, logical cores usable by us, memory, load average now, and library versions."""
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "mem_total_gib": _mem_total_gib(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "transformers", "grpc", "vllm")},
    }
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        info["gpu"] = None
    info["versions"].update(extra_versions or {})
    return info


def begin(max_load: float, logger: logging.Logger) -> float:
    """A benchmark's start: `[bench]` log lines, and a warning when the machine is already busy (the 1-min
    load average above `max_load`). Returns that load average (recorded in the results)."""
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    load0 = load_average_1m()
    if load0 > max_load:
        logger.warning(
            "1-min load average %.2f > %.2f: the cores are shared; figures will be noisy", load0, max_load
        )
    return load0


def load_average_1m() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    tie_word_embeddings: bool = True

    def kwargs(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def build_model(out_dir: Path, shape: LlamaShape, *, seed: int, max_len: int = 2048) -> Path:
    """A random-init Llama with the SmolLM2 tokenizer (49,152 ids), built once per folder."""
    from teacher_server.models import default_teacher_dir
    from tests.tiny_models import build_tiny_llama

    if (out_dir / "config.json").exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    build_tiny_llama(
        tmp,
        tokenizer_from=default_teacher_dir(),
        seed=seed,
        max_position_embeddings=max_len,
        **shape.kwargs(),
    )
    tmp.rename(out_dir)
    return out_dir


def count_params(model_dir: Path) -> int:
    """Parameter count from the config alone (meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- processes
def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """All descendants of `pid`, from /proc/*/stat (no subprocess, so sampling costs little CPU)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name field may hold spaces and parentheses
        children.setdefault(ppid, []).append(int(entry))
    todo, found = [pid], []
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


class ProcessTreePeak:
    """Peak RSS of a process tree: sum of each process's VmHWM (its own peak), sampled until `read()`.

    Sampling keeps the peak of processes that exit early; VmHWM itself never misses a spike of a live one.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.peaks: dict[int, int] = {}

    def sample(self) -> None:
        for p in [self.pid, *_descendants(self.pid)]:
            self.peaks[p] = max(self.peaks.get(p, 0), _vm_hwm_kib(p))

    def read_mb(self) -> float:
        self.sample()
        return sum(self.peaks.values()) / 1024


# ---------------------------------------------------------------------------------------------- numbers
def summarize(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": vals,
    }


def fmt_summary(s: dict | None, digits: int = 2) -> str:
    """A `summarize()` result as "median (min–max)" ("—" when empty)."""
    if not s or s.get("median") is None:
        return "—"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def fmt_gib(s: dict | None) -> str:
    """The median of a `summarize()` result in MB, as GiB ("—" when empty)."""
    return "—" if not s or s.get("median") is None else f"{s['median'] / 1024:.2f}"


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, save (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def cache_root() -> Path:
    """Where the benchmarks keep their model folders and run folders ($ASYMKD_CACHE/bench)."""
    from asymkd.paths import cache_dir

    return cache_dir() / "bench"
