"""`asymkd plan --emit slurm|k8s DIR`: the launch files of the best plan the deployment can launch.

    paths = emit(cfg, result, data)        # DIR/run.yaml + DIR/submit.sh, or DIR/kustomization.yaml + parts

What the deployments in deploy/ launch, and so what a plan must look like to be emitted:
- slurm (deploy/slurm/asymkd.sbatch RUN.yaml, a heterogeneous job): component 0 runs one `asymkd serve` per
  node (`serve.vllm.nnodes` > 1: one per that many nodes), component 1 one torchrun per node with
  `nproc_per_node` ranks. So: whole nodes per side, a replica = all GPUs of its node(s), the student on
  every GPU of its nodes. Written: DIR/run.yaml (the `asymkd run` file) and DIR/submit.sh (the sbatch line
  with per-component --nodes/--gpus-per-node).
- k8s (deploy/k8s/base, Kustomize): a teacher Deployment of pods of tp × pp GPUs (a replica inside one pod:
  no multi-node replica), a student Indexed Job of NNODES pods × NPROC_PER_NODE GPUs. Written: an overlay
  DIR/kustomization.yaml on deploy/k8s/base with the replica count, serve.yaml/train.yaml (TP, PP, FSDP
  shape, micro-batches, prefetch) and GPU patches, like deploy/k8s/overlays/prod.
When the best plan cannot be launched that way, the best one that can is written, and the report says what
it costs. Every file is checked with the loaders that will read it (RunConfig, ServeConfig, TrainConfig).
Model folders, data and image are placeholders unless the teacher/student were given as folders.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from asymkd.config import ConfigError, load_config
from asymkd.planner.config import PlanConfig
from asymkd.planner.report import layout_text, plan_dict
from asymkd.planner.search import Plan, PlanResult

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "deploy" / "slurm" / "asymkd.sbatch"
K8S_BASE = REPO / "deploy" / "k8s" / "base"


def deployable(p: Plan, kind: str, gpus_per_node: int) -> str | None:
    """None when `kind` can launch plan `p`, else why not."""
    if p.kind != "split" or p.teacher is None or p.split is None:
        return "the symmetric layout runs in one training job (teacher.in_process), not as a teacher service"
    t, sp = p.teacher.layout, p.split
    g = t.gpus_per_replica
    if kind == "slurm":
        if sp.shared:
            return "deploy/slurm gives each component whole nodes (no node shared by teacher and student)"
        if g % gpus_per_node or sp.t_nodes % (g // gpus_per_node):
            return (
                f"deploy/slurm runs one `asymkd serve` per node: a replica must use whole nodes, not {g} GPUs"
            )
        return None
    if g > gpus_per_node:
        return f"deploy/k8s has no multi-node replica (a {g}-GPU replica needs a LeaderWorkerSet)"
    return None


def pick(result: PlanResult, kind: str, gpus_per_node: int) -> tuple[Plan, str]:
    """The best plan `kind` can launch, and a note when it is not the best plan overall."""
    why = deployable(result.best, kind, gpus_per_node)
    if why is None:
        return result.best, ""
    for p in result.candidates:
        if deployable(p, kind, gpus_per_node) is None:
            loss = 1 - p.samples_per_s / result.best.samples_per_s
            return p, (
                f"the best plan ({result.best.samples_per_s:.4g} samples/s) cannot be launched by {kind}: {why}; "
                f"written instead: the best plan it can launch, {p.samples_per_s:.4g} samples/s "
                f"({100 * loss:.1f}% less)"
            )
    raise ValueError(f"no plan of this cluster can be launched by {kind}: {why}")


def emit(cfg: PlanConfig, result: PlanResult, gpus_per_node: int) -> tuple[list[Path], dict[str, Any]]:
    """Write the launch files into cfg.emit_dir; (paths, a report with the plan written and any note)."""
    plan, note = pick(result, cfg.emit, gpus_per_node)
    out = Path(cfg.emit_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    d = plan_dict(plan, gpus_per_node)
    assert d is not None
    train, serve = train_section(cfg, plan), serve_section(cfg, plan)
    header = f"asymkd plan --emit {cfg.emit}: {layout_text(d)}; predicted {plan.samples_per_s:.4g} samples/s"
    if cfg.emit == "slurm":
        paths = write_slurm(out, header, serve, train, plan, gpus_per_node)
    else:
        paths = write_k8s(out, header, serve, train, plan)
    return paths, {"kind": cfg.emit, "plan": d, "note": note, "files": [str(p) for p in paths]}


# ------------------------------------------------------------------------------------------ the configs
def _model(spec: str, fallback: str) -> str:
    path = Path(spec).expanduser()
    return str(path.absolute()) if path.is_dir() else fallback


def serve_section(cfg: PlanConfig, p: Plan) -> dict[str, Any]:
    t = p.teacher.layout  # type: ignore[union-attr]
    return {
        "model": _model(cfg.teacher, f"/models/{cfg.teacher}"),  # set: the teacher's HF folder
        "backend": "vllm",
        "dtype": cfg.dtype,
        "tensor_parallel_size": t.tp,
        "pipeline_parallel_size": t.pp,
        "max_top_k": max(cfg.top_k, 1),
        "max_seq_len": cfg.seq_len,
        "vllm": {"runner": "pooling", "gpu_memory_utilization": 0.9},
    }


def train_section(cfg: PlanConfig, p: Plan) -> dict[str, Any]:
    s = p.student
    assert s is not None
    ranks = s.layout.gpus
    accum = math.ceil(cfg.global_batch / (ranks * cfg.micro_batch))
    if cfg.signal not in ("top_k", "full"):
        raise ValueError(
            f"the trainer takes distill.signal top_k or full; --signal {cfg.signal} cannot be emitted"
        )
    return {
        "model": {"path": _model(cfg.student, f"/models/{cfg.student}")},  # set: the student's HF folder
        "data": {"paths": ["/models/data/train.jsonl"], "seq_len": cfg.seq_len},  # set: your data
        "optim": {"micro_batch_size": cfg.micro_batch, "grad_accum_steps": accum},
        "parallel": {
            "device": "cuda",
            "param_dtype": cfg.dtype,
            "dp_shard": s.layout.dp_shard,
            "dp_replicate": s.layout.dp_replicate,
            "activation_checkpointing": s.recompute,
        },
        "distill": {"signal": cfg.signal} | ({"top_k": cfg.top_k} if cfg.signal == "top_k" else {}),
        "teacher": {"prefetch": cfg.prefetch},
        "checkpoint": {"resume": True},
    }


def _dump(path: Path, header: str, data: dict[str, Any]) -> Path:
    lines = [f"# {line}" for line in header.splitlines()]
    path.write_text("\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def _check(cls: type, path: Path, what: str) -> None:
    try:
        load_config(cls, path)
    except ConfigError as e:
        raise ValueError(f"the {what} written to {path} is refused by its loader: {e}") from None


# ------------------------------------------------------------------------------------------------ slurm
def write_slurm(out: Path, header: str, serve: dict, train: dict, p: Plan, gpus_per_node: int) -> list[Path]:
    from asymkd.local_run import RunConfig

    sp, t = p.split, p.teacher.layout  # type: ignore[union-attr]
    assert sp is not None
    nnodes = t.gpus_per_replica // gpus_per_node
    if nnodes > 1:
        serve["vllm"]["nnodes"] = nnodes
    run = {"serve": serve, "train": train, "nproc_per_node": gpus_per_node, "teacher_start_timeout_s": 1800.0}
    note = "serve.model, train.model.path and train.data are placeholders unless given as folders: set them."
    run_yaml = _dump(out / "run.yaml", f"{header}\n{note}", run)
    _check(RunConfig, run_yaml, "run file")
    line = (
        f"sbatch --nodes={sp.t_nodes} --gpus-per-node={gpus_per_node} --exclusive : "
        f"--nodes={sp.s_nodes} --gpus-per-node={gpus_per_node} --exclusive {SBATCH} {run_yaml}"
    )
    submit = out / "submit.sh"
    submit.write_text(
        "#!/bin/bash\n"
        f"# {header}\n"
        f"# component 0: {sp.t_nodes} teacher node(s), {t.replicas} replica(s) of TP {t.tp} x PP {t.pp}; "
        f"component 1: {sp.s_nodes} student node(s) x {gpus_per_node} ranks (deploy/slurm/README.md)\n"
        "set -euo pipefail\n"
        f"{line}\n"
    )
    submit.chmod(0o755)
    return [run_yaml, submit]


# -------------------------------------------------------------------------------------------------- k8s
def write_k8s(out: Path, header: str, serve: dict, train: dict, p: Plan) -> list[Path]:
    from student_trainer.config import TrainConfig
    from teacher_server.config import ServeConfig

    sp, t = p.split, p.teacher.layout  # type: ignore[union-attr]
    assert sp is not None
    train["teacher"] |= {"targets": ["dns:///asymkd-teacher-headless:50051"], "timeout_s": 120.0}
    train["run"] = {"out_dir": "/runs/asymkd"}
    if not serve["model"].startswith("/models/"):  # pods read weights from the volume (deploy/k8s/README.md)
        serve["model"] = "/models/teacher"
    if not train["model"]["path"].startswith("/models/"):
        train["model"]["path"] = "/models/student"
    g = t.gpus_per_replica
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "asymkd"}}
    files = {
        "serve.yaml": ("`asymkd serve` keys (the teacher pods)", serve),
        "train.yaml": ("`asymkd train` keys (the student Job)", train),
        "namespace.yaml": (header, namespace),
        "teacher-gpu.yaml": (f"teacher pods: {g} GPU(s) each = TP {t.tp} x PP {t.pp}", _teacher_patch(g)),
        "student-gpu.yaml": (
            f"student: {sp.s_nodes} pod(s) x {sp.s_per_node} GPU(s)",
            _student_patch(sp.s_nodes, sp.s_per_node),
        ),
    }
    paths = [_dump(out / name, head, body) for name, (head, body) in files.items()]
    _check(ServeConfig, out / "serve.yaml", "serve config")
    _check(TrainConfig, out / "train.yaml", "train config")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "asymkd",
        "resources": ["namespace.yaml", os.path.relpath(K8S_BASE, out)],
        "images": [{"name": "asymkd", "newTag": "cuda"}],
        "replicas": [{"name": "asymkd-teacher", "count": t.replicas}],
        "configMapGenerator": [
            {"name": "asymkd-config", "behavior": "replace", "files": ["serve.yaml", "train.yaml"]}
        ],
        "patches": [{"path": "teacher-gpu.yaml"}, {"path": "student-gpu.yaml"}],
    }
    note = "kubectl apply -k DIR; the image and the weights volume as in deploy/k8s/README.md"
    return [_dump(out / "kustomization.yaml", f"{header}\n{note}", kustomization), *paths]


def _gpu_pod(gpus: int) -> dict[str, Any]:
    return {
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{8 * gpus}Gi"}}],
    }


def _resources(gpus: int) -> dict[str, Any]:
    return {
        "requests": {"cpu": str(8 * gpus), "memory": f"{64 * gpus}Gi", "nvidia.com/gpu": str(gpus)},
        "limits": {"memory": f"{128 * gpus}Gi", "nvidia.com/gpu": str(gpus)},
    }


def _teacher_patch(gpus: int) -> dict[str, Any]:
    container = {
        "name": "teacher",
        "env": [{"name": "OMP_NUM_THREADS", "value": "8"}],
        "resources": _resources(gpus),
    }
    spec = _gpu_pod(gpus) | {"containers": [container]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "asymkd-teacher"},
            "spec": {"template": {"spec": spec}}}  # fmt: skip


def _student_patch(pods: int, gpus: int) -> dict[str, Any]:
    env = [{"name": "NNODES", "value": str(pods)}, {"name": "NPROC_PER_NODE", "value": str(gpus)},
           {"name": "OMP_NUM_THREADS", "value": "8"}]  # fmt: skip
    container = {"name": "student", "env": env, "resources": _resources(gpus)}
    spec = _gpu_pod(gpus) | {"containers": [container]}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "asymkd-student"},
            "spec": {"completions": pods, "parallelism": pods, "template": {"spec": spec}}}  # fmt: skip
