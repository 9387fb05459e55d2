"""Process group, device mesh and FSDP2 for the student (torchtitan style: `apply_*` transforms).

    dist_info = init_distributed("cpu")                 # torchrun env, or a 1-rank group without torchrun
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, world_size=dist_info.world_size)
    mesh = dims.build_mesh(dist_info.device.type)
    apply_ac(model)                                     # optional: recompute each block in backward
    apply_fsdp(model, mesh, mp_policy("float32", "float32"), reshard_after_forward=True)

Runs under `torchrun` (gloo on CPU, NCCL on CUDA), 1..N ranks, multi-node; started without torchrun it forms
a 1-rank group so every code path (FSDP, DCP checkpoints, collectives) is the same.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from student_trainer.model import decoder_blocks


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("parallel.device='cuda' but no CUDA device is visible")
    return device


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); a 1-rank group when run directly."""
    device_type = resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend, timeout=timeout, device_id=dev if device_type == "cuda" else None
            )
        else:  # plain `python`/`asymkd train`: no rendezvous needed for one rank
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev)


def destroy_distributed() -> None:
    """Leave the process group together: a rank that tears its group down while a peer still has work on it can
    make the peer's gloo threads abort the process at exit ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        with contextlib.suppress(Exception):  # a peer gone or elsewhere (a failure path): do not wait for it
            dist.barrier(async_op=True).wait(datetime.timedelta(seconds=10))
    dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelDims:
    """Data-parallel degrees; their product must equal WORLD_SIZE (dp_shard=-1 takes what is left)."""

    dp_replicate: int
    dp_shard: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dp_shard == -1:
            if self.world_size % self.dp_replicate:
                raise ValueError(
                    f"dp_replicate={self.dp_replicate} does not divide WORLD_SIZE={self.world_size} "
                    "(dp_shard=-1 takes WORLD_SIZE / dp_replicate)"
                )
            object.__setattr__(self, "dp_shard", self.world_size // self.dp_replicate)
        if self.dp_shard < 1:
            raise ValueError(f"dp_shard={self.dp_shard} must be >= 1 or -1 (all remaining ranks)")
        if self.dp_replicate * self.dp_shard != self.world_size:
            raise ValueError(
                f"dp_replicate={self.dp_replicate} × dp_shard={self.dp_shard} = "
                f"{self.dp_replicate * self.dp_shard} does not match WORLD_SIZE={self.world_size}"
            )

    @property
    def dp_size(self) -> int:
        """Ranks that see different data (all of them: every degree here is data parallel)."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        if self.dp_replicate > 1:
            return init_device_mesh(
                device_type, (self.dp_replicate, self.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
            )
        return init_device_mesh(device_type, (self.dp_shard,), mesh_dim_names=("dp_shard",))


def mp_policy(param_dtype: str, reduce_dtype: str, device_type: str) -> MixedPrecisionPolicy:
    """bf16 compute / fp32 reduce on GPU by default, fp32 everything on CPU; `reduce_dtype` as configured."""
    if param_dtype == "auto":
        param_dtype = "bfloat16" if device_type == "cuda" else "float32"
    return MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype), reduce_dtype=getattr(torch, reduce_dtype)
    )


def apply_ac(model: nn.Module) -> None:
    """Wrap each decoder block so its activations are recomputed in backward (apply before `apply_fsdp`)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, mp: MixedPrecisionPolicy, reshard_after_forward: bool = True
) -> nn.Module:
    """`fully_shard` each decoder block, then the root (embeddings, final norm, LM head)."""
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over all ranks (a no-op without a process group); returns `t`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_1d(t: torch.Tensor) -> torch.Tensor:
    """Concatenate an equal-length 1-D tensor from every rank, rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global L2 grad norm over all shards (DTensor-aware); clips in place when max_norm > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # sum of the shards' squared norms over the mesh
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
