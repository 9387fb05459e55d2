"""`asymkd plan`: refusal with numbers, legal TP/PP degrees, the inflection point's direction and its agreement
with the cost model, the symmetric layout never ahead of the best plan, the issue's command line, bad input."""

from __future__ import annotations

import itertools
import json
import math
import random
import shlex

import pytest

from asymkd.cli import main
from asymkd.config import ConfigError, load_config
from asymkd.planner.cluster import Cluster, Link, Workload, build_inputs
from asymkd.planner.command import emit_argv
from asymkd.planner.config import PlanConfig
from asymkd.planner.cost import TeacherLayout, teacher_cost
from asymkd.planner.inflection import bandwidth_star, inflection, m_star, request_terms
from asymkd.planner.presets import MODEL_PRESETS, ModelShape, resolve_model
from asymkd.planner.search import NoPlanError, search, teacher_layouts

ISSUE_LINE = (
    "asymkd plan --teacher llama3-70b --student llama3-8b --nodes 8 --gpus-per-node 8 --gpu h100 "
    "--seq-len 4096 --global-batch 256 --json"
)
ISSUE_ARGV = shlex.split(ISSUE_LINE)[1:]


def plan_cfg(**kw) -> PlanConfig:
    return PlanConfig(**({"teacher": "llama3-70b", "student": "llama3-8b"} | kw))


def inputs(**kw) -> tuple[Cluster, Workload]:
    return build_inputs(plan_cfg(**kw))


# ----------------------------------------------------------------------------------------- command line
def test_issue_command_line_prints_the_json_contract(capsys):
    assert main(ISSUE_ARGV) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("best", "runner_up", "symmetric_samples_per_s", "gain_over_symmetric", "inflection"):
        assert key in data
    for key in ("best", "runner_up"):
        plan = data[key]
        assert set(plan["teacher"]) >= {"replicas", "tp", "pp", "gpus"}
        assert set(plan["student"]) >= {"dp_shard", "dp_replicate", "gpus"}
        assert plan["samples_per_s"] > 0 and plan["bottleneck"]
    best = data["best"]
    if best["kind"] == "split":
        t, s = best["teacher"], best["student"]
        assert t["replicas"] * t["tp"] * t["pp"] == t["gpus"]
        assert s["dp_shard"] * s["dp_replicate"] == s["gpus"]
        assert t["gpus"] + s["gpus"] == 64
    assert data["gain_over_symmetric"] == pytest.approx(
        best["samples_per_s"] / data["symmetric_samples_per_s"], rel=1e-3
    )
    assert data["gain_over_symmetric"] >= 1.0


def test_text_output_names_best_runner_up_bottleneck_gain_and_inflection(capsys):
    assert main(ISSUE_ARGV[:-1]) == 0
    out = capsys.readouterr().out
    for word in ("best", "runner-up", "bottleneck", "symmetric", "gain", "inflection", "m* ="):
        assert word in out


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--teacher", "llama3-700b", "--student", "llama3-8b"], "teacher"),
        (["--teacher", "llama3-70b", "--student", "nope"], "student"),
        (["--teacher", "llama3-70b", "--student", "llama3-8b", "--nodes", "0"], "nodes"),
        (["--teacher", "llama3-70b", "--student", "llama3-8b", "--gpu", "v100"], "gpu"),
        (["--teacher", "llama3-70b", "--student", "llama3-8b", "--mfu", "1.5"], "mfu"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_key(capsys, argv, key):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"asymkd plan: config error: {key}")


def test_model_that_fits_nowhere_is_refused_with_the_numbers(capsys):
    argv = ["plan", "--teacher", "llama3.1-405b", "--student", "llama3-8b", "--nodes", "1"]
    assert main([*argv, "--gpus-per-node", "2", "--gpu", "a100"]) == 1
    err = capsys.readouterr().err
    assert "no plan fits on 1 × 2 a100 (80 GB per GPU" in err
    assert "llama3.1-405b (405.9B params)" in err
    assert "weights 811.7" in err and "vs 78.0 GB usable" in err  # 405.9B × 2 bytes on the one teacher GPU
    cl, wl = inputs(teacher="llama3.1-405b", nodes=1, gpus_per_node=2, gpu="a100")
    with pytest.raises(NoPlanError, match="symmetric"):
        search(MODEL_PRESETS["llama3.1-405b"], MODEL_PRESETS["llama3-8b"], cl, wl)


def test_emit_takes_a_kind_and_a_folder():
    assert emit_argv(["--emit", "slurm", "out", "--json"]) == [
        "--emit",
        "slurm",
        "--emit-dir",
        "out",
        "--json",
    ]
    assert emit_argv(["--emit=k8s", "d"]) == ["--emit", "k8s", "--emit-dir", "d"]
    assert emit_argv(["--nodes", "2"]) == ["--nodes", "2"]
    with pytest.raises(ConfigError, match="emit"):
        load_config(
            PlanConfig, None, ["--teacher", "llama3-8b", "--student", "llama3.2-1b", "--emit", "slurm"]
        )


# ---------------------------------------------------------------------------------------------- models
def test_models_from_a_folder_and_from_sizes(tmp_path):
    cfg = {"num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "head_dim": 64, "tie_word_embeddings": True}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from_folder = resolve_model(str(tmp_path))
    assert from_folder.params() == MODEL_PRESETS["llama3.2-1b"].params()
    sizes = resolve_model("layers=80,hidden=8192,intermediate=28672,heads=64,kv_heads=8,vocab=128256")
    assert sizes.params() == MODEL_PRESETS["llama3-70b"].params()
    assert 70.0e9 < sizes.params() < 71.0e9  # Llama 3 70B: 70.6B parameters
    assert 1.23e9 < MODEL_PRESETS["llama3.2-1b"].params() < 1.24e9  # Llama 3.2 1B: 1.24B
    with pytest.raises(ValueError, match="unknown size 'depth'"):
        resolve_model("depth=3,hidden=8")


# ------------------------------------------------------------------------------------------- TP and PP
@pytest.mark.parametrize("name", ["llama3-70b", "qwen3-32b", "qwen3-1.7b", "llama3.1-405b"])
def test_tp_and_pp_degrees_divide_heads_and_layers(name):
    model = MODEL_PRESETS[name]
    odd = ModelShape("odd", layers=30, hidden=1536, intermediate=4096, heads=12, kv_heads=4, vocab=32000)
    for m in (model, odd):
        for nodes, per_node in ((1, 8), (2, 8), (4, 6), (3, 4)):
            layouts = teacher_layouts(m, nodes, per_node)
            assert layouts, (m.name, nodes, per_node)
            for lay in layouts:
                assert m.heads % lay.tp == 0 and m.layers % lay.pp == 0
                assert m.kv_heads % lay.tp == 0 or lay.tp % m.kv_heads == 0
                assert lay.tp <= per_node and lay.gpus == nodes * per_node
    assert {lay.tp for lay in teacher_layouts(odd, 1, 8)} == {1, 2, 4}  # 12 heads, 4 KV heads, 8 GPUs


# ------------------------------------------------------------------------------------------- inflection
def _pure(model: ModelShape, g: int, in_flight: float, cl: Cluster, wl: Workload) -> tuple[float, float]:
    """Samples/s of one pure-TP and one pure-PP replica of g GPUs with `in_flight` requests per replica."""
    ranks = in_flight / wl.prefetch  # m = prefetch × student ranks / replicas
    tp = teacher_cost(model, TeacherLayout(1, g, 1), cl, wl, student_ranks=ranks).samples_per_s
    pp = teacher_cost(model, TeacherLayout(1, 1, g), cl, wl, student_ranks=ranks).samples_per_s
    return tp, pp


@pytest.mark.parametrize(
    ("name", "g"), [("llama3-70b", 8), ("llama3-70b", 4), ("qwen3-32b", 8), ("llama3-8b", 2)]
)
def test_closed_form_m_star_is_where_the_cost_model_flips(name, g):
    model = MODEL_PRESETS[name]
    cl, wl = inputs(intra_gbps=40)  # a slow link, so the crossing is within reach
    w, a = request_terms(model, cl, wl)
    m = m_star(w, a, model.layers, g, cl.intra)
    assert 1 < m < 1e4
    tp, pp = _pure(model, g, m * 0.98, cl, wl)
    assert tp > pp  # fewer requests in flight: the bubble costs more than the all-reduces
    tp, pp = _pure(model, g, m * 1.02, cl, wl)
    assert pp > tp
    tp, pp = _pure(model, g, m, cl, wl)
    assert tp == pytest.approx(pp, rel=1e-9)


def test_inflection_moves_with_bandwidth_and_prefetch_as_derived():
    model = MODEL_PRESETS["llama3-70b"]
    cl, wl = inputs()
    w, a = request_terms(model, cl, wl)
    # A faster link makes TP cheaper: PP needs more requests in flight (m* rises).
    stars = [m_star(w, a, model.layers, 8, Link(gb * 1e9, 5e-6)) for gb in (10, 25, 50, 100, 200, 400)]
    assert all(x < y for x, y in itertools.pairwise(stars))
    # More requests in flight shrink the bubble: PP wins up to faster links (B* rises) ...
    b_stars = [bandwidth_star(w, a, model.layers, 8, m, 5e-6) for m in (1, 2, 4, 8, 16, 64)]
    assert all(x < y for x, y in itertools.pairwise(b_stars))
    # ... and through the whole command: a deeper teacher.prefetch moves the reported point.
    shallow = inflection(model, gpus_per_replica=8, in_flight=2, cluster=cl, workload=wl)
    deep = inflection(model, gpus_per_replica=8, in_flight=32, cluster=cl, workload=wl)
    assert deep.bandwidth_star_gbps > shallow.bandwidth_star_gbps
    assert deep.m_star == shallow.m_star  # m* depends on the link, not on the depth
    assert (shallow.favours, deep.favours) == ("tp", "pp")  # 2 < m* ≈ 16.6 < 32 on an H100 node


def test_at_b_star_both_splits_cost_the_same():
    model = MODEL_PRESETS["qwen3-32b"]
    cl, wl = inputs()
    w, a = request_terms(model, cl, wl)
    b = bandwidth_star(w, a, model.layers, 4, 6.0, cl.intra.latency_s)
    assert 0 < b < math.inf
    slow = Cluster(**{**cl.__dict__, "intra": Link(b * 0.9, cl.intra.latency_s)})
    fast = Cluster(**{**cl.__dict__, "intra": Link(b * 1.1, cl.intra.latency_s)})
    tp, pp = _pure(model, 4, 6.0, slow, wl)
    assert pp > tp
    tp, pp = _pure(model, 4, 6.0, fast, wl)
    assert tp > pp


# --------------------------------------------------------------------------------------------- property
def _random_case(rng: random.Random) -> tuple[ModelShape, ModelShape, dict]:
    def model(scale: int) -> ModelShape:
        kv = rng.choice([1, 2, 4, 8])
        heads = kv * rng.choice([1, 2, 4, 8])
        hd = rng.choice([64, 128])
        return ModelShape("m", rng.choice([8, 12, 16, 24, 32, 40, 48, 64, 80]) // scale or 2, heads * hd,
                          heads * hd * rng.choice([2, 3, 4]), heads, kv, rng.choice([32000, 128256]))  # fmt: skip

    teacher, student = model(1), model(rng.choice([2, 4, 8]))
    kw = {
        "nodes": rng.choice([1, 1, 2, 3, 4]), "gpus_per_node": rng.choice([2, 4, 8]),
        "gpu": rng.choice(["h100", "h200", "a100"]), "global_batch": rng.choice([16, 64, 256]),
        "seq_len": rng.choice([512, 2048, 4096]), "prefetch": rng.choice([1, 4, 16]),
        "signal": rng.choice(["top_k", "full", "hidden"]), "mfu": rng.choice([0.3, 0.5]),
        "teacher_mfu": rng.choice([0.3, 0.5, 0.7]), "inter_gbps": rng.choice([5, 25, 50]),
    }  # fmt: skip
    return teacher, student, kw


def test_symmetric_layout_is_never_predicted_faster_than_the_best_plan():
    rng = random.Random(20260627)
    kinds, checked = set(), 0
    for _ in range(400):
        teacher, student, kw = _random_case(rng)
        cl, wl = inputs(**kw)
        try:
            result = search(teacher, student, cl, wl)
        except NoPlanError:
            continue
        checked += 1
        kinds.add(result.best.kind)
        assert all(result.best.samples_per_s >= p.samples_per_s for p in result.candidates)
        if result.symmetric is not None:
            assert result.best.samples_per_s >= result.symmetric.samples_per_s
            assert result.gain_over_symmetric >= 1.0
        if result.runner_up is not None:
            assert result.runner_up.samples_per_s <= result.best.samples_per_s
        plan = result.best.teacher or result.best.symmetric
        assert plan is not None and plan.memory.fits
    assert checked >= 250
    assert kinds == {"split", "symmetric"}  # both win somewhere: the property is not vacuous


# ------------------------------------------------------------------------------------------------- emit
def _fake_scontrol(*args: str) -> str:
    """`scontrol show hostnames` / `show node -o` as SLURM 22.05 prints them (no cluster in unit tests)."""
    if args[:2] == ("show", "hostnames"):
        return "gpu1\n"
    return "NodeName=gpu1 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=gpu1 State=IDLE\n"


def test_emit_slurm_writes_the_run_file_and_sbatch_line_deploy_slurm_takes(tmp_path, capsys):
    from asymkd import hetjob

    out = tmp_path / "slurm"
    assert main([*ISSUE_ARGV, "--emit", "slurm", str(out)]) == 0
    emitted = json.loads(capsys.readouterr().out)["emit"]
    t, s = emitted["plan"]["teacher"], emitted["plan"]["student"]
    line = (out / "submit.sh").read_text().splitlines()[-1].split()
    assert line[:4] == ["sbatch", f"--nodes={t['nodes']}", "--gpus-per-node=8", "--exclusive"]
    assert line[4:8] == [":", f"--nodes={s['nodes']}", "--gpus-per-node=8", "--exclusive"]
    assert line[8].endswith("deploy/slurm/asymkd.sbatch") and line[9] == str(out / "run.yaml")
    assert t["nodes"] + s["nodes"] == 8 and (t["tp"] * t["pp"]) % 8 == 0  # a replica = whole nodes
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES_HET_GROUP_0": str(t["nodes"]), "ASYMKD_JOB_DIR": str(tmp_path / "job"),
           "SLURM_JOB_NUM_NODES_HET_GROUP_1": str(s["nodes"]), "SLURM_JOB_NODELIST_HET_GROUP_1": "gpu1"}  # fmt: skip
    job = hetjob.prepare(out / "run.yaml", env, _fake_scontrol)  # the batch script's own check of the file
    plan = json.loads((job / "plan.json").read_text())
    assert plan["teacher_nodes"] == t["nodes"] and plan["nproc_per_node"] == 8
    assert plan["teacher_nodes"] // plan["nodes_per_replica"] == t["replicas"]


def test_emit_k8s_writes_an_overlay_on_the_base_with_the_plan(tmp_path, capsys):
    import shutil
    import subprocess

    import yaml

    out = tmp_path / "k8s"
    assert main([*ISSUE_ARGV, "--emit", "k8s", str(out)]) == 0
    emitted = json.loads(capsys.readouterr().out)["emit"]
    t, s = emitted["plan"]["teacher"], emitted["plan"]["student"]
    serve = yaml.safe_load((out / "serve.yaml").read_text())
    train = yaml.safe_load((out / "train.yaml").read_text())
    assert (serve["tensor_parallel_size"], serve["pipeline_parallel_size"]) == (t["tp"], t["pp"])
    assert (train["parallel"]["dp_shard"], train["parallel"]["dp_replicate"]) == (
        s["dp_shard"],
        s["dp_replicate"],
    )
    ranks = s["gpus"]
    assert train["optim"]["micro_batch_size"] * train["optim"]["grad_accum_steps"] * ranks >= 256
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the overlay is not rendered")
    rendered = subprocess.run(["kubectl", "kustomize", str(out)], capture_output=True, text=True, check=True)
    objs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(rendered.stdout) if o}
    teacher = objs[("Deployment", "asymkd-teacher")]
    assert teacher["spec"]["replicas"] == t["replicas"]
    limits = teacher["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(t["tp"] * t["pp"])
    job = objs[("Job", "asymkd-student")]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == s["nodes"]
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["NNODES"], env["NPROC_PER_NODE"]) == (str(s["nodes"]), str(s["gpus_per_node"]))
