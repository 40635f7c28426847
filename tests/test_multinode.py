"""Multi-node launching on real infrastructure: a two-node SLURM cluster (slurm-wlm + munge, two slurmd on
this machine) and two sshd hosts on 127.0.0.2 and 127.0.0.3 (fixtures in tests/multinode.py). Every run
is the smoke recipe (tiny random Llama, LoRA) with one gloo process per node, so world size 2 spans the
two nodes. `ftl` runs as a subprocess, as users run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher import rundir as R
from launchkit import ftl_env, losses, ok, only_run, processes_mentioning, run_ftl, wait_for

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"
TIMEOUT_S = 300
LOSS_REL_TOL = 1e-4
STEPS = ["--set", "train.max_steps=12"]  # checkpoints at 3, 6, 9, 12

pytestmark = pytest.mark.slow


# --- helpers --------------------------------------------------------------------------------------


def ftl(*args, runs_dir: Path, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S,
        background: bool = False):
    extra = {"FTL_PREFLIGHT_TIMEOUT": "60", "FTL_STOP_GRACE_S": "30", **(env or {})}
    return run_ftl(args, cwd=runs_dir.parent, env=ftl_env(runs_dir, extra), timeout=timeout, background=background)


_ok = ok


def processes_of(run_dir: Path) -> list[tuple[int, str]]:
    """Live processes whose command line mentions the run directory (node processes, trainers)."""
    return processes_mentioning(str(run_dir))


def assert_two_node_world(run: R.Run, node_names: set[str]) -> None:
    reports = {k: json.loads((run.dir / "shards" / f"rank-{k}.json").read_text()) for k in (0, 1)}
    for k, rep in reports.items():
        assert rep["process_group_size"] == 2 and rep["world_size"] == 2 and rep["rank"] == k
        assert rep["node_rank"] == k  # one process per node: global rank k lives on node k
    assert {rep["node"] for rep in reports.values()} == node_names
    pre = json.loads((run.dir / "preflight" / "node-0.json").read_text())
    assert pre["ok"] and [n["rank"] for n in pre["nodes"]] == [0, 1]


def _profile(tmp_path: Path, name: str, **fields) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, **fields}))
    return p


# --- SLURM ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_profile(slurm_cluster, tmp_path_factory) -> Path:
    return _profile(tmp_path_factory.mktemp("profiles"), "test-slurm", provider="slurm", partition="debug",
                    gpus_per_node=1, nodes=1, time_limit="10", cpus_per_task=1,
                    env={"GLOO_SOCKET_IFNAME": "lo"})


@pytest.fixture(scope="module")
def slurm_reference(slurm_cluster, slurm_profile, tmp_path_factory):
    """An uninterrupted two-node run of 12 steps (the happy path, and the reference for preemption)."""
    runs_dir = tmp_path_factory.mktemp("slurm-ref") / "runs"
    res = ftl("launch", SMOKE, "--cluster", slurm_profile, "--nodes", 2, *STEPS, runs_dir=runs_dir,
              env=slurm_cluster.env)
    return runs_dir, res


def test_slurm_two_nodes_train_world_2_and_loss_falls(slurm_cluster, slurm_reference):
    runs_dir, res = slurm_reference
    _ok(res)
    run = only_run(runs_dir)
    st = run.state()
    assert st["status"] == "completed" and st["backend"] == "slurm" and st["slurm"]["job_id"]
    assert_two_node_world(run, {"node1", "node2"})
    ls = losses(run)
    assert sorted(ls) == list(range(1, 13)) and ls[12] < ls[1]
    assert (run.dir / "output" / "adapter_config.json").is_file()
    assert "submitted SLURM job" in res.stderr and "step 12/12" in res.stdout
    assert not processes_of(run.dir)
    # job control on the finished run
    env = slurm_cluster.env
    status = json.loads(ftl("status", run.id, "--json", runs_dir=runs_dir, env=env).stdout)
    assert status["state"]["status"] == "completed" and status["world_size"] == 2
    node1_log = ftl("logs", run.id, "--rank", 1, runs_dir=runs_dir, env=env)
    _ok(node1_log)
    assert "node node2 (rank 1) of 2" in node1_log.stdout
    assert "GLOO_SOCKET_IFNAME=lo" in node1_log.stdout  # the profile's network settings reach every node
    rows = json.loads(ftl("ps", "--json", runs_dir=runs_dir, env=env).stdout)
    assert rows[0]["backend"] == "slurm" and rows[0]["where"].startswith(f"job {st['slurm']['job_id']}")


def test_slurm_preemption_requeues_and_resumes_without_losing_a_step(slurm_cluster, slurm_profile, slurm_reference,
                                                                      tmp_path):
    ref_runs, ref_res = slurm_reference
    _ok(ref_res)
    reference = losses(only_run(ref_runs))
    runs_dir = tmp_path / "runs"
    # submitted detached (the scheduler keeps the job), then followed with `ftl logs -f` until it ends
    sub = ftl("launch", SMOKE, "--cluster", slurm_profile, "--nodes", 2, *STEPS, "--detach", "--json",
              runs_dir=runs_dir, env=slurm_cluster.env)
    _ok(sub)
    submitted = json.loads(sub.stdout)
    run, job = only_run(runs_dir), submitted["slurm"]["job_id"]
    assert submitted["run_id"] == run.id and submitted["status"] == "running"
    p = ftl("logs", run.id, "--follow", runs_dir=runs_dir, env=slurm_cluster.env, background=True)
    try:
        wait_for(lambda: (run.checkpoints_dir / "checkpoint-3" / "COMPLETE").is_file(), 180, "checkpoint-3")
        # what SLURM sends before a time limit or on preemption (submitit's --signal=USR2@90), to the steps
        slurm_cluster.run("scancel", "--signal=USR2", job)
        out, err = p.communicate(timeout=TIMEOUT_S)  # logs -f returns when the requeued job has finished
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-5000:]
    assert "step 12/12" in out and "SLURM restart 1" in out
    log0 = (run.dir / "logs" / "node-0.log").read_text()
    assert "SLURM restart 1" in log0 and "resuming from" in log0
    info = slurm_cluster.run("scontrol", "show", "job", "-o", job)
    assert "Restarts=1" in info and "JobState=COMPLETED" in info
    got = losses(run)
    assert sorted(got) == list(range(1, 13))  # same final step count, no step missing
    for step, loss in reference.items():  # equal to the uninterrupted run, the step after the resume included
        assert abs(got[step] - loss) <= LOSS_REL_TOL * abs(loss), (step, got[step], loss)
    assert run.state()["status"] == "completed" and not processes_of(run.dir)


def test_slurm_cancel_checkpoints_stops_and_resumes(slurm_cluster, slurm_profile, tmp_path):
    runs_dir = tmp_path / "runs"
    p = ftl("launch", SMOKE, "--cluster", slurm_profile, "--nodes", 2, "--set", "train.max_steps=12",
            runs_dir=runs_dir, env=slurm_cluster.env, background=True)
    try:
        run = wait_for(lambda: (R.list_runs(runs_dir) or [None])[0], 60, "the run directory")
        wait_for(lambda: (run.checkpoints_dir / "checkpoint-3" / "COMPLETE").is_file(), 180, "checkpoint-3")
        res = ftl("cancel", run.id, runs_dir=runs_dir, env=slurm_cluster.env)
        _ok(res)
        p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    st = run.state()
    assert st["status"] == "stopped", st
    assert (run.result() or {}).get("status") == "interrupted"
    newest = run.newest_checkpoint()
    stopped_at = int(newest.name.split("-")[1])
    assert 3 < stopped_at < 12  # saved at the stop, not only at step 3
    wait_for(lambda: not processes_of(run.dir), 30, "every process of the run to end")
    res = ftl("launch", "--resume", run.id, runs_dir=runs_dir, env=slurm_cluster.env)  # a new job, same run
    _ok(res)
    assert run.state()["status"] == "completed" and sorted(losses(run)) == list(range(1, 13))
    assert f"resuming from {newest}" in (run.dir / "logs" / "node-0.log").read_text()


def test_slurm_preflight_names_the_node_and_the_check(slurm_cluster, tmp_path):
    # the profile asks for a GPU per node: SLURM allocates one (GRES on this test cluster), but the node has
    # no GPU torch can use, so the pre-flight stops the job before training
    prof = _profile(tmp_path, "gpu-slurm", provider="slurm", partition="debug", gpu="a100-80gb", gpus_per_node=1,
                    nodes=2, time_limit="5")
    runs_dir = tmp_path / "runs"
    res = ftl("launch", SMOKE, "--cluster", prof, runs_dir=runs_dir, env=slurm_cluster.env, timeout=180)
    assert res.returncode != 0
    assert "pre-flight failed" in res.stderr and "node node1 (rank 0)" in res.stderr
    assert "the plan needs 1 GPU(s) per node, torch sees 0" in res.stderr
    run = only_run(runs_dir)
    assert run.state()["status"] == "failed" and not run.checkpoints_dir.exists()
    assert not (run.dir / "metrics.jsonl").exists()


def test_exported_sbatch_runs_to_completion_with_hostile_names(slurm_cluster, slurm_profile, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("still here")
    weird = tmp_path / "a dir with 'quotes' and \"double\" $HOME"
    runs_dir = weird / "runs"
    runs_dir.parent.mkdir(parents=True)
    name = f"x; rm -rf {canary}; echo $(touch {tmp_path}/pwned) `id`"
    script = tmp_path / "job.sbatch"
    res = ftl("launch", SMOKE, "--cluster", slurm_profile, "--nodes", 2,
              "--set", f"name={name}", "--set", "train.max_steps=3", "--export", script,
              runs_dir=runs_dir, env=slurm_cluster.env)
    _ok(res)
    run = only_run(runs_dir)
    assert run.state()["status"] == "created" and run.state()["recipe"] == name
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "launcher.agent" in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = slurm_cluster.run("sbatch", "--parsable", str(script), timeout=60).strip()
    job = out.split(";")[0]
    wait_for(lambda: "JobState=COMPLETED" in slurm_cluster.run("scontrol", "show", "job", "-o", job, check=False)
             or "JobState=FAILED" in slurm_cluster.run("scontrol", "show", "job", "-o", job, check=False),
             240, "the exported job to end")
    assert "JobState=COMPLETED" in slurm_cluster.run("scontrol", "show", "job", "-o", job)
    assert (run.result() or {}).get("status") == "completed"
    assert_two_node_world(run, {"node1", "node2"})
    assert canary.read_text() == "still here" and not (tmp_path / "pwned").exists()
    status = json.loads(ftl("status", run.id, "--json", runs_dir=runs_dir, env=slurm_cluster.env).stdout)
    assert status["state"]["status"] == "completed" and status["state"]["slurm"]["job_id"] == job


def test_slurm_refuses_hub_model_not_in_cache_before_submitting(slurm_cluster, slurm_profile, tmp_path):
    runs_dir = tmp_path / "runs"
    token = "hf_secretTOKENvalue123456"
    res = ftl("launch", SMOKE, "--cluster", slurm_profile, "--nodes", 2, "--set", "model=Qwen/Qwen2.5-0.5B",
              "--force", runs_dir=runs_dir, env={**slurm_cluster.env, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode != 0
    assert "Qwen/Qwen2.5-0.5B" in res.stderr and "HF_HUB_OFFLINE" in res.stderr
    assert token not in res.stdout + res.stderr
    assert slurm_cluster.run("squeue", "-h").strip() == ""  # nothing was submitted


# --- SSH ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssh_profile(ssh_hosts, tmp_path_factory) -> Path:
    return _profile(tmp_path_factory.mktemp("profiles"), "test-ssh", provider="ssh", gpus_per_node=1, nodes=2,
                    hosts=[{k: h[k] for k in ("host", "port", "user", "key")} for h in ssh_hosts.hosts])


def test_ssh_two_hosts_train_world_2_with_hostile_names(ssh_profile, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("still here")
    runs_dir = tmp_path / "it's a \"runs\" dir; $(touch pwned)" / "runs"
    runs_dir.parent.mkdir(parents=True)
    name = f"ssh 'smoke'; rm -rf {canary} && touch {tmp_path}/pwned"
    secret = "hf_sshSECRETtoken987"
    res = ftl("launch", SMOKE, "--cluster", ssh_profile, "--set", f"name={name}", "--set", "cluster.env.HF_TOKEN=<redacted>",
              runs_dir=runs_dir, env={"HF_TOKEN": secret})
    _ok(res)
    run = only_run(runs_dir)
    st = run.state()
    assert st["status"] == "completed" and [h["host"] for h in st["hosts"]] == ["127.0.0.2", "127.0.0.3"]
    assert_two_node_world(run, {"127.0.0.2", "127.0.0.3"})
    ls = losses(run)
    assert ls[max(ls)] < ls[1]
    log = run.log_path.read_text()
    assert "[node 0]" in log and "[node 1]" in log and "step 6/6" in log
    assert canary.read_text() == "still here" and not (tmp_path / "pwned").exists()
    assert not processes_of(run.dir)
    for f in run.dir.rglob("*"):  # the secret went to the nodes on stdin, never to a file or a log
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in res.stdout + res.stderr


def _trainer_of_rank(run_dir: Path, rank: int) -> int | None:
    for pid, cmd in processes_of(run_dir):
        if "launcher.train" not in cmd or "accelerate" in cmd:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def test_ssh_failure_on_one_host_stops_the_other_and_leaves_nothing(ssh_profile, tmp_path):
    runs_dir = tmp_path / "runs"
    p = ftl("launch", SMOKE, "--cluster", ssh_profile, "--set", "train.max_steps=300", runs_dir=runs_dir,
            background=True)
    try:
        run = wait_for(lambda: (R.list_runs(runs_dir) or [None])[0], 60, "the run directory")
        wait_for(lambda: (R.last_metrics(run.metrics_path) or {}).get("step", 0) >= 1, 120, "the first step")
        victim = wait_for(lambda: _trainer_of_rank(run.dir, 1), 30, "rank 1's trainer")
        os.kill(victim, signal.SIGKILL)  # a crash on host 2
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    st = run.state()
    assert st["status"] == "failed" and "node 1 (127.0.0.3" in (st["error"] or ""), st
    assert "stopping the other nodes" in err
    wait_for(lambda: not processes_of(run.dir), 30, "no process of the run left on either host")


def test_ssh_profile_errors_name_the_field(tmp_path):
    prof = _profile(tmp_path, "few-hosts", provider="ssh", nodes=2, hosts=[{"host": "127.0.0.2"}])
    res = ftl("launch", SMOKE, "--cluster", prof, "--dry-run", runs_dir=tmp_path / "runs")
    assert res.returncode != 0 and "cluster.hosts lists 1 host" in res.stderr


def test_ssh_zero3_across_hosts_shards_stops_on_ctrl_c_and_resumes(ssh_profile, tmp_path):
    """ZeRO-3 over two hosts (torchrun on each, not DeepSpeed's pdsh launcher): each rank holds what the
    estimator says for world size 2 on 2 nodes × 1; Ctrl-C stops every node with a checkpoint and leaves
    no process; `ftl launch --resume` continues over SSH to the last step."""
    from launcher.spec.catalog import resolve_model
    from launcher.estimate.estimator import build_arch
    from launcher.estimate.params import plan_params
    from launcher.estimate.states import state_bytes
    from launcher.spec.recipe import recipe_from_dict

    runs_dir = tmp_path / "runs"
    p = ftl("launch", SMOKE, "--cluster", ssh_profile, "--set", "parallel.strategy=zero3", "--set", "method=full",
            *STEPS, runs_dir=runs_dir, background=True)
    try:
        run = wait_for(lambda: (R.list_runs(runs_dir) or [None])[0], 60, "the run directory")
        wait_for(lambda: (run.checkpoints_dir / "checkpoint-3" / "COMPLETE").is_file(), 180, "checkpoint-3")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGINT, err[-4000:]
    assert run.state()["status"] == "stopped" and "ftl launch --resume" in err
    stopped_at = int(run.newest_checkpoint().name.split("-")[1])
    assert 3 <= stopped_at < 12
    wait_for(lambda: not processes_of(run.dir), 30, "no process left after Ctrl-C")

    recipe = recipe_from_dict(yaml.safe_load(run.recipe_path.read_text()), run.recipe_path)
    arch = build_arch(recipe, resolve_model(recipe.model))
    params = plan_params(arch, recipe)
    est = state_bytes(arch, params, recipe, "zero3", 2, 1)
    want = est.weights - est.detail.get("buffers", 0) - est.gathered - est.detail.get("ZeRO-3 persistent params", 0)
    for k in (0, 1):
        rep = json.loads((run.dir / "shards" / f"rank-{k}.json").read_text())
        assert rep["distributed_type"] == "DEEPSPEED" and rep["process_group_size"] == 2 and rep["node_rank"] == k
        assert rep["local_bytes"]["params"] == want and rep["local_bytes"]["optimizer"] == est.optimizer
    assert want == pytest.approx(4 * params.total / 2, rel=0.01)

    res = ftl("launch", "--resume", run.id, runs_dir=runs_dir)
    _ok(res)
    assert run.state()["status"] == "completed" and sorted(losses(run)) == list(range(1, 13))
    assert f"checkpoint-{stopped_at}" in (run.dir / "logs" / "node-0.log").read_text().split("resuming from")[-1]
    assert not processes_of(run.dir)
