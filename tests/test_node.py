"""launcher.agent.node's pieces without a cluster: the pre-flight rendezvous over real loopback sockets, the
comparison of node facts, and the SLURM helpers (time limits, ports, sbatch options and scripts)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from launcher.agent import node
from launcher.backends.slurm import export_sbatch, sbatch_params, slurm_minutes
from launcher.agent.node import Place, PreflightError, compare, meet, own_problems, slurm_port
from launcher.spec import packages
from launcher.spec.recipe import dump_recipe, load_recipe
from launcher.render import Plan, free_port
from launcher.rundir import Run

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"


def _facts(rank: int, node: str, **over) -> dict:
    f = {"rank": rank, "node": node, "python": "3.11.7", "torch": "2.13.0", "transformers": "5.24.0", "ftl": "0.1.0",
         "gpus": 8, "cuda_visible_devices": None, "problems": []}
    f.update(over)
    return f


def test_compare_names_the_node_the_check_and_both_values():
    assert compare([_facts(0, "a"), _facts(1, "b")]) == []
    out = compare([_facts(0, "a"), _facts(1, "b", torch="2.4.0")])
    assert out == ["node b (rank 1): torch 2.4.0, but 2.13.0 on node a (rank 0); install the same versions on every node"]
    out = compare([_facts(1, "b", problems=["no GPU"]), _facts(0, "a")])
    assert out == ["node b (rank 1): no GPU"]


def test_own_problems_counts_real_devices_not_the_visible_list():
    plan = Plan(strategy="ddp", world_size=16, nodes=2, gpus_per_node=8, device="cuda")
    assert own_problems(plan, _facts(0, "a")) == []
    (msg,) = own_problems(plan, _facts(0, "a", gpus=0, cuda_visible_devices="0,1"))
    assert "needs 8 GPU(s) per node, torch sees 0 (CUDA_VISIBLE_DEVICES=0,1)" in msg
    assert own_problems(Plan("ddp", 2, 2, 1, "cpu"), _facts(0, "a", gpus=0)) == []


def _meet_two(facts1: dict, timeout: float = 10):
    port = free_port()
    answers: dict[int, object] = {}

    def decide(gathered):
        problems = compare(gathered)
        return {"ok": not problems, "error": "; ".join(problems) or None, "seen": sorted(f["rank"] for f in gathered)}

    def node(rank: int, facts: dict) -> None:
        try:
            answers[rank] = meet(Place(rank, 2, "127.0.0.1", port, f"n{rank}"), facts, decide, timeout=timeout)
        except PreflightError as e:
            answers[rank] = e

    threads = [threading.Thread(target=node, args=(0, _facts(0, "n0"))), threading.Thread(target=node, args=(1, facts1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return answers


def test_preflight_checks_the_optional_packages_on_the_node(tmp_path, monkeypatch):
    """The launching machine cannot see a node's packages: the node says report_to: wandb needs wandb, with the
    pip line, before anything trains."""
    run = Run("r", tmp_path / "r")
    run.dir.mkdir()
    recipe = load_recipe(SMOKE, sets=["train.report_to=wandb"])
    run.recipe_path.write_text(yaml.safe_dump(dump_recipe(recipe)))
    monkeypatch.setattr(node, "node_facts", lambda place: _facts(0, "a"))
    monkeypatch.setattr(packages, "installed", lambda module: module != "wandb")
    plan = Plan(strategy="ddp", world_size=1, nodes=1, gpus_per_node=1, device="cpu")
    place = Place(rank=0, nodes=1, main_addr="127.0.0.1", port=0, name="a")
    answer = node.preflight(run, plan, place)
    assert answer["ok"] is False and "train.report_to = 'wandb' needs the wandb package" in answer["error"]
    assert "pip install" in answer["error"] and answer["error"].startswith("node a (rank 0): ")
    monkeypatch.setattr(packages, "installed", lambda module: True)
    assert node.preflight(run, plan, place)["ok"] is True


def test_meet_gathers_every_node_and_gives_all_the_same_answer():
    answers = _meet_two(_facts(1, "n1"))
    assert answers[0] == answers[1] == {"ok": True, "error": None, "seen": [0, 1]}


def test_meet_failure_reaches_every_node():
    answers = _meet_two(_facts(1, "n1", ftl="0.0.9"))
    assert answers[0] == answers[1]
    assert answers[0]["ok"] is False and "node n1 (rank 1): ftl 0.0.9, but 0.1.0 on node n0 (rank 0)" in answers[0]["error"]


def test_unreachable_main_node_is_named_with_address_and_port():
    port = free_port()  # nobody listens there
    with pytest.raises(PreflightError, match=rf"node n1 \(rank 1\): cannot reach the main node at 127.0.0.1:{port} within 2 s"):
        meet(Place(1, 2, "127.0.0.1", port, "n1"), _facts(1, "n1"), lambda g: {"ok": True}, timeout=2)


def test_missing_node_is_named_by_the_main_node():
    with pytest.raises(PreflightError, match=r"node rank\(s\) \[1\] did not reach"):
        meet(Place(0, 2, "127.0.0.1", free_port(), "n0"), _facts(0, "n0"), lambda g: {"ok": True}, timeout=2)


@pytest.mark.parametrize("limit,minutes", [(None, 60), ("30", 30), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440),
                                           ("1-2:30", 1590), ("0-0:0:59", 1), ("24:00:00", 1440)])
def test_slurm_time_limits(limit, minutes):
    assert slurm_minutes(limit) == minutes


def test_slurm_time_limit_typo_names_the_field():
    with pytest.raises(Exception, match=r"cluster.time_limit = '2h'"):
        slurm_minutes("2h")


def test_slurm_port_is_chosen_free_by_node_0_and_read_by_the_others(tmp_path):
    import socket

    port = slurm_port(tmp_path, "123", "0", 0)
    with socket.socket() as s:
        s.bind(("", port))  # it was free
    assert slurm_port(tmp_path, "123", "0", 1) == port == slurm_port(tmp_path, "123", "0", 3)
    with pytest.raises(PreflightError, match="never published the rendezvous port"):
        slurm_port(tmp_path, "123", "1", 1, timeout=0.5)  # a requeued job waits for its own node 0


def _recipe(tmp_path: Path, **cluster):
    prof = tmp_path / "p.yaml"
    import yaml

    prof.write_text(yaml.safe_dump({"name": "p", "provider": "slurm", **cluster}))
    return load_recipe(SMOKE, cluster=prof)


def test_sbatch_params_from_the_profile(tmp_path):
    r = _recipe(tmp_path, partition="gpu", account="proj", qos="high", time_limit="2:00:00", gpu="h100-sxm",
                gpus_per_node=8, nodes=2, cpus_per_task=32, mem="0", constraint="h100", setup=["module load cuda"],
                sbatch_options={"exclusive": True, "mail_type": "END"})
    p = sbatch_params(Run("r-1", tmp_path / "r-1"), r, "cuda")
    assert p == {"job_name": "r-1", "nodes": 2, "ntasks_per_node": 1, "time": 120, "stderr_to_stdout": True,
                 "gpus_per_node": 8, "partition": "gpu", "account": "proj", "qos": "high", "cpus_per_task": 32,
                 "mem": "0", "constraint": "h100", "setup": ["module load cuda"],
                 "additional_parameters": {"exclusive": True, "mail-type": "END", "requeue": True}}
    assert "gpus_per_node" not in sbatch_params(Run("r-1", tmp_path), r, "cpu")  # CPU worlds ask for no GPU


def test_exported_script_quotes_everything(tmp_path):
    weird = tmp_path / "runs 'a' \"b\" $(touch pwned) `id`" / "r-1"
    r = _recipe(tmp_path, partition="debug", nodes=2, setup=["echo setup"])
    text = export_sbatch(Run("r-1", weird), r, "cpu", python="/opt/py thon/bin/python")
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert "#SBATCH --nodes=2" in text and "#SBATCH --signal=USR1@90" in text and "echo setup" in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    import shlex

    argv = shlex.split(srun)
    assert argv[argv.index("--run-dir") + 1] == str(weird) and "/opt/py thon/bin/python" in argv
    assert not (tmp_path / "pwned").exists()


def test_a_profile_setup_provides_the_interpreter(tmp_path):
    """With a setup that activates an environment and no cluster.python, the job runs the `python` the setup
    puts on PATH (the exported script and submitit's alike), not the launching machine's interpreter."""
    import shlex
    import sys

    from launcher.backends.slurm import submitted_script

    r = _recipe(tmp_path, partition="debug", nodes=2, setup=["source ~/venvs/ftl/bin/activate"])
    run = Run("r-1", tmp_path / "r-1")
    srun = next(line for line in export_sbatch(run, r, "cpu").splitlines() if line.startswith("srun "))
    assert shlex.split(srun)[3:5] == ["python", "-m"] and sys.executable not in srun
    assert sys.executable not in submitted_script(run, r, "cpu")
    plain = _recipe(tmp_path, partition="debug", nodes=2)
    assert sys.executable in export_sbatch(run, plain, "cpu")  # no setup: the shared filesystem's interpreter


@pytest.mark.parametrize("provider,fields,shows", [
    ("slurm", {"partition": "debug", "nodes": 2}, ["#SBATCH --nodes=2", "#SBATCH --partition=debug", "#SBATCH --signal=USR2@90",
                                                  "submitit.core._submit", "-m launcher.agent --run-dir"]),
    ("ssh", {"nodes": 2, "hosts": [{"host": "10.1.0.1", "user": "ubuntu"}, {"host": "10.1.0.2", "user": "ubuntu"}]},
     ["ssh -p 22 ubuntu@10.1.0.1", "--machine-rank 1", "--main-addr 10.1.0.1"]),
    ("runpod", {"gpu": "a100-80gb", "price_per_gpu_hour": 1.89}, ["would rent", "ftl-smoke-", "at $1.89/GPU-hour"]),
])
def test_dry_run_shows_what_each_provider_would_run_and_starts_nothing(tmp_path, monkeypatch, provider, fields, shows):
    import yaml
    from typer.testing import CliRunner

    from launcher.cli import app

    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"name": "p", "provider": provider, **fields}))
    monkeypatch.setenv("FTL_RUNS_DIR", str(tmp_path / "runs"))
    res = CliRunner().invoke(app, ["launch", str(SMOKE), "--cluster", str(prof), "--dry-run"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for s in shows:
        assert s in text, s
    assert not (tmp_path / "runs").exists()


def test_slurm_launch_without_slurm_tools_says_so_and_creates_nothing(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from launcher.cli import app

    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"name": "p", "provider": "slurm", "nodes": 2}))
    monkeypatch.setenv("FTL_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    res = CliRunner().invoke(app, ["launch", str(SMOKE), "--cluster", str(prof)])
    assert res.exit_code == 2 and "SLURM client tools not found" in " ".join(res.output.split())
    assert not (tmp_path / "runs").exists()
