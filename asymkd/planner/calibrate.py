"""`asymkd plan --calibrate`: measure this machine instead of reading a datasheet, in a few seconds.

    spec, report = calibrate(budget_s=8.0)       # a GpuSpec of the measured rates + what was measured

A "device" is a GPU when CUDA is there, else one CPU core (the planner then splits cores the way it splits
GPUs; `bench/planner.py` runs the plans it predicts on them). Probes, each bounded in time:
- compute: a square matmul in the device's dtype (bf16 on GPU, fp32 on CPU, one thread per core) -> FLOP/s;
- memory: a large tensor copy on one device -> bytes/s (HBM on a GPU, DRAM from one core);
- link: a gloo pair of two separately started processes on loopback (`TCPStore` + `ProcessGroupGloo`,
  /work/shared/RECIPES.md), ping-pong of 4 bytes (latency) and 16 MB messages (bandwidth). Between GPUs of
  one node this is a lower bound of NVLink (it goes through host memory); nothing between nodes can be
  measured from one machine, so the inter-node figures stay the preset's.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

from asymkd.planner.presets import GPU_PRESETS, GpuSpec

log = logging.getLogger("asymkd.plan")
PAIR_SIZES = (4, 16 << 20)


def _timed(fn, budget_s: float, min_reps: int = 3) -> float:
    """Median seconds of fn() over repeats that fit in budget_s (after one warm-up call)."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < min_reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return sorted(times)[len(times) // 2]


def matmul_flops(budget_s: float, device: str) -> tuple[float, str]:
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def step() -> None:
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / _timed(step, budget_s), f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}"


def copy_bytes_per_s(budget_s: float, device: str) -> float:
    import torch

    src = torch.empty(64 << 20, dtype=torch.uint8, device=device).fill_(1)  # 64 MB, past the caches
    dst = torch.empty_like(src)

    def step() -> None:
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * src.numel() / _timed(step, budget_s)  # read + write


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair_group(rank: int, port: int, timeout_s: float):
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=timeout_s))
    store = dist.PrefixStore("asymkd-calibrate/", store)
    return dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=timeout_s))


def _ping_pong(pg, rank: int, nbytes: int, reps: int) -> float:
    """Seconds per one-way message: the median round trip / 2 (rank 0 sends, rank 1 echoes); two untimed
    round trips first (connection set-up). The median, not the mean: a busy core delays single trips."""
    import torch

    buf = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32)
    trips: list[float] = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        if rank == 0:
            pg.send([buf], 1, i).wait()
            pg.recv([buf], 1, i).wait()
        else:
            pg.recv([buf], 0, i).wait()
            pg.send([buf], 0, i).wait()
        trips.append(time.perf_counter() - t0)
    return sorted(trips[2:])[reps // 2] / 2


def gloo_pair(budget_s: float) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) between two processes on loopback; the peer is a child process."""
    port = _free_port()
    timeout_s = max(budget_s * 4, 20.0)
    cmd = [sys.executable, "-m", "asymkd.planner.calibrate", "--peer", str(port), str(timeout_s)]
    peer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pg = _pair_group(0, port, timeout_s)
        latency = _ping_pong(pg, 0, PAIR_SIZES[0], 50)
        per_msg = _ping_pong(pg, 0, PAIR_SIZES[1], 6)
        peer.wait(timeout=timeout_s)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    return PAIR_SIZES[1] / max(per_msg - latency, 1e-9), latency


def _peer(port: int, timeout_s: float) -> None:
    pg = _pair_group(1, port, timeout_s)
    _ping_pong(pg, 1, PAIR_SIZES[0], 50)
    _ping_pong(pg, 1, PAIR_SIZES[1], 6)


def calibrate(budget_s: float = 8.0, *, gpus_per_node: int | None = None) -> tuple[GpuSpec, dict[str, Any]]:
    """Measured rates of this machine as a GpuSpec (per device) and the report that goes into --json."""
    import torch

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # one device = one core
    try:
        flops, shape = matmul_flops(budget_s * 0.3, device)
        copy = copy_bytes_per_s(budget_s * 0.1, device)
    finally:
        torch.set_num_threads(threads)
    bw, lat = gloo_pair(budget_s * 0.3)
    devices = torch.cuda.device_count() if cuda else len(os.sched_getaffinity(0))
    mem_gb = (
        torch.cuda.get_device_properties(0).total_memory / 1e9
        if cuda
        else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 / devices
    )
    preset = GPU_PRESETS["h100"]
    spec = GpuSpec(
        name=torch.cuda.get_device_name(0) if cuda else "cpu-core",
        mem_gb=mem_gb, peak_tflops=flops / 1e12, hbm_gbps=copy / 1e9, intra_gbps=bw / 1e9,
        inter_gbps=bw / 1e9 if not cuda else preset.inter_gbps, intra_latency_us=lat * 1e6,
        inter_latency_us=lat * 1e6 if not cuda else preset.inter_latency_us,
        gpus_per_node=gpus_per_node or devices, overlap_comm=cuda,
    )  # fmt: skip
    report = {
        "device": "cuda" if cuda else "cpu core (no GPU on this machine: no GPU figure was measured)",
        "devices": devices, "matmul": shape, "matmul_tflops": flops / 1e12, "copy_gbps": copy / 1e9,
        "gloo_pair_gbps": bw / 1e9, "gloo_pair_latency_us": lat * 1e6, "seconds": time.perf_counter() - t0,
        "not_measured": ["inter-node bandwidth and latency (one machine)"] + ([] if cuda else ["GPU anything"]),
    }  # fmt: skip
    log.info("calibrated in %.1f s: %s", report["seconds"], report)
    return spec, report


if __name__ == "__main__" and sys.argv[1:2] == ["--peer"]:
    _peer(int(sys.argv[2]), float(sys.argv[3]))
