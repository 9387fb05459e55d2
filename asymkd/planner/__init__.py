"""Partition planner (`asymkd plan`): picks the teacher/student split of a cluster from a cost model.

    asymkd plan --teacher llama3-70b --student llama3-8b --nodes 8 --gpus-per-node 8 --gpu h100 \
        --seq-len 4096 --global-batch 256 [--json] [--calibrate] [--emit slurm|k8s DIR]

Modules: presets (model shapes, GPU datasheets), config (PlanConfig), cluster (achievable rates, workload,
link costs), cost (the cost model), search (enumeration, best/runner-up, refusal), inflection (the closed-form
TP/PP crossing), report (text/JSON/markdown), calibrate (measure this machine), emit (SLURM/Kubernetes files),
command (the handler body). The model and its derivation: docs/planner.md.
"""
