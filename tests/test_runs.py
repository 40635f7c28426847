"""launcher/rundir and launcher/launch.py: the run directory and the launch flow before any process starts: run ids, run directories, state,
checkpoint selection, refusals, and `ftl launch --dry-run` (which starts and writes nothing)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from launcher import launch as L
from launcher import rundir as R
from launcher.core import files as F
from launcher.cli import app
from launcher.core.errors import FtlError
from launcher.spec.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"
NOW = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?-\d{8}-\d{6}(?:-\d+)?$")

needs_smoke = pytest.mark.skipif(not SMOKE.is_file(), reason="recipes/smoke.yaml not written yet")


# --- run ids --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [
    ("x; rm -rf ~", "x-rm-rf"),
    ("My Recipe (v2)", "my-recipe-v2"),
    ("it's \"quoted\" `cmd` $(x)", "it-s-quoted-cmd-x"),
    ("Llama-3.1_8B  QLoRA", "llama-3-1-8b-qlora"),
    ("Café crème ñandú", "cafe-creme-nandu"),
    ("日本語", "run"),
    ("---", "run"),
    ("a" * 39 + "-bcd", "a" * 39),  # cut at 40, trailing '-' stripped
    ("../../etc/passwd", "etc-passwd"),
    ("line\nbreak\ttab", "line-break-tab"),
])
def test_slug(name, expected):
    assert R.slug(name) == expected


@pytest.mark.parametrize("name", ["x; rm -rf ~", "'\"", "A" * 200, "日本語 🚀", "a b", "-x-", "$HOME", "x\n"])
def test_run_id_is_shell_and_instance_safe(name):
    rid = R.run_id_base(name, NOW)
    assert ID_RE.match(rid), rid
    assert rid.endswith("-20250304-050607")
    assert len(rid) <= 40 + 16
    assert shlex.quote(rid) == rid  # needs no quoting in a shell line
    assert R.is_valid_run_id(rid)


def test_run_id_suffix_when_taken(tmp_path):
    a = R.create_run_dir("demo", tmp_path, NOW)
    b = R.create_run_dir("demo", tmp_path, NOW)
    c = R.create_run_dir("demo", tmp_path, NOW)
    assert [a.id, b.id, c.id] == ["demo-20250304-050607", "demo-20250304-050607-2", "demo-20250304-050607-3"]
    assert R.next_run_id("demo", tmp_path, NOW) == "demo-20250304-050607-4"
    assert (a.dir / "logs").is_dir() and a.dir == (tmp_path / a.id).resolve()


def test_runs_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FTL_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert R.runs_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("FTL_RUNS_DIR")
    monkeypatch.chdir(tmp_path)
    assert R.runs_root() == tmp_path / "runs"


# --- atomic state ---------------------------------------------------------------------------------


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    f = tmp_path / "state.json"
    F.write_json(f, {"status": "created"})
    F.write_json(f, {"status": "running", "pid": 7})
    assert json.loads(f.read_text()) == {"status": "running", "pid": 7}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_atomic_failure_keeps_old_content(tmp_path, monkeypatch):
    f = tmp_path / "state.json"
    F.write_json(f, {"status": "created"})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(F.os, "replace", boom)
    with pytest.raises(OSError):
        F.write_json(f, {"status": "running"})
    assert json.loads(f.read_text()) == {"status": "created"}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the temp file was removed


def test_state_update_and_effective_status(tmp_path):
    run = R.create_run_dir("s", tmp_path, NOW)
    F.write_json(run.state_path, R.initial_state(run, "s"))
    st = run.update_state(status="running", pid=999_999_999, pgid=999_999_999, launcher_pid=999_999_999)
    assert st["run_id"] == run.id and st["resumed_from"] == [] and st["status"] == "running"
    # the launcher and its processes are gone: the run is failed, and state.json says so
    assert L.run_status(run) == "failed"
    st = run.state()
    assert st["status"] == "failed" and st["ended"] and "launcher" in st["error"]
    run.update_state(status="running", launcher_pid=os.getpid())
    assert L.run_status(run) == "running"


def test_effective_status_trusts_the_trainers_result(tmp_path):
    """The launcher was killed but the ranks finished: result.json decides, not a blanket 'failed'."""
    import time

    run = R.create_run_dir("s", tmp_path, NOW)
    F.write_json(run.state_path, {**R.initial_state(run, "s"), "status": "running", "started": F.utcnow(),
                                  "launcher_pid": 999_999_999, "pgid": 999_999_999})
    F.write_json(run.result_path, {"status": "completed", "finished_at": time.time() + 1})
    assert L.run_status(run) == "completed" and run.state()["error"] is None
    run.update_state(status="running")
    F.write_json(run.result_path, {"status": "interrupted", "finished_at": time.time() + 1})
    assert L.run_status(run) == "stopped"


def test_read_json_names_a_broken_file(tmp_path):
    f = tmp_path / "state.json"
    f.write_text("{not json")
    with pytest.raises(FtlError, match="not valid JSON"):
        F.read_json(f)


# --- checkpoints ----------------------------------------------------------------------------------


def _ckpt(run_dir: Path, step: int, complete: bool) -> Path:
    d = run_dir / "checkpoints" / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (d / "COMPLETE").write_text("")
    return d


def test_newest_complete_checkpoint_ignores_half_written(tmp_path):
    assert R.newest_complete_checkpoint(tmp_path / "checkpoints") is None
    _ckpt(tmp_path, 3, True)
    _ckpt(tmp_path, 9, True)
    best = _ckpt(tmp_path, 10, True)  # numeric, not lexical, order
    _ckpt(tmp_path, 12, False)  # half-written: never picked
    (tmp_path / "checkpoints" / "checkpoint-15.tmp").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-20").write_text("a file, not a checkpoint")
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert R.newest_complete_checkpoint(tmp_path / "checkpoints") == best.resolve()
    assert [(s, c) for s, _, c in R.checkpoints(tmp_path / "checkpoints")] == [(3, True), (9, True), (10, True), (12, False)]


def test_only_half_written_checkpoints(tmp_path):
    _ckpt(tmp_path, 3, False)
    assert R.newest_complete_checkpoint(tmp_path / "checkpoints") is None


def test_last_metrics_skips_torn_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 3.0}\n{"eval_loss": 2.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    assert R.last_metrics(f) == {"step": 2, "loss": 2.5}
    assert [m.get("step") for m in R.read_metrics(f)] == [1, None, 2]
    assert R.last_metrics(tmp_path / "missing.jsonl") is None


# --- finding runs ---------------------------------------------------------------------------------


def test_find_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs"
    a = R.create_run_dir("alpha", root, NOW)
    b = R.create_run_dir("beta", root, NOW)
    for r in (a, b):
        F.write_json(r.state_path, R.initial_state(r, r.id))
    assert R.find_run(a.id).dir == a.dir
    assert R.find_run(f"runs/{a.id}").dir == a.dir
    assert R.find_run(str(a.dir)).dir == a.dir
    assert R.find_run("alp").id == a.id  # a unique prefix
    assert [r.id for r in R.list_runs()] == sorted([a.id, b.id], key=lambda i: (R.Run(i, root / i).state()["created"], i))
    with pytest.raises(FtlError, match="no run 'gamma'"):
        R.find_run("gamma")
    R.create_run_dir("alpha", root, NOW)  # alpha-...-2 (no state: not a run yet)
    c = R.create_run_dir("alpha", root, NOW)
    F.write_json(c.state_path, R.initial_state(c, c.id))
    with pytest.raises(FtlError, match="ambiguous"):
        R.find_run("alp")


# --- the launch flow, before any process ------------------------------------------------------------


def _recipe(tmp_path, **over):
    raw = yaml.safe_load(SMOKE.read_text())
    raw["model"] = str(ROOT / "recipes" / "assets" / "tiny-llama")
    raw["data"]["path"] = str(ROOT / "recipes" / "data" / "alpaca.jsonl")
    for k, v in over.items():
        node = raw
        *parents, last = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return recipe_from_dict(raw, tmp_path / "r.yaml")


@needs_smoke
def test_prepare_writes_nothing_and_resolves_auto(tmp_path):
    r = _recipe(tmp_path, **{"parallel.strategy": "auto", "cluster.gpus_per_node": 2})
    p = L.prepare_launch(r, root=tmp_path / "runs", gpu_count=0)
    L.render_files(p, python="/py", port=12345, cwd=str(tmp_path))
    assert not (tmp_path / "runs").exists()
    assert p.plan.strategy == p.recipe.parallel.strategy == "ddp" and p.plan.device == "cpu" and p.plan.world_size == 2
    assert r.parallel.strategy == "auto"  # the caller's recipe is not changed
    assert set(p.files) == {"recipe.yaml", "plan.json", "accelerate.yaml", "command.sh"}
    plan = json.loads(p.files["plan.json"])
    assert plan["estimate"]["world_size"] == 2 and plan["deepspeed_config"] is None
    assert yaml.safe_load(p.files["recipe.yaml"])["parallel"]["strategy"] == "ddp"
    assert "--run-dir " + str(p.run.dir) in p.files["command.sh"]


@needs_smoke
def test_write_run_layout(tmp_path):
    r = _recipe(tmp_path, **{"parallel.strategy": "zero3", "cluster.gpus_per_node": 2, "train.precision": "bf16"})
    p = L.prepare_launch(r, root=tmp_path / "runs", gpu_count=0)
    L.render_files(p, python="/py", port=12345)
    run = L.write_run(p)
    names = sorted(x.name for x in run.dir.iterdir())
    assert names == ["accelerate.yaml", "command.sh", "deepspeed.json", "logs", "plan.json", "recipe.yaml", "state.json"]
    plan = json.loads(run.plan_path.read_text())
    assert plan["deepspeed_config"] == str(run.dir / "deepspeed.json") and plan["strategy"] == "zero3"
    acc = yaml.safe_load(run.accelerate_path.read_text())
    assert acc["deepspeed_config"]["deepspeed_config_file"] == str(run.dir / "deepspeed.json")
    st = run.state()
    assert st["status"] == "created" and st["run_id"] == run.id and st["resumed_from"] == []
    assert os.access(run.command_path, os.X_OK)
    # the resolved recipe loads back as the same recipe, with absolute paths
    back = recipe_from_dict(yaml.safe_load(run.recipe_path.read_text()), run.recipe_path)
    assert back.model == r.model and back.data.path == r.data.path and Path(back.model).is_absolute()


@needs_smoke
def test_secrets_never_written(tmp_path):
    r = _recipe(tmp_path, **{"cluster.env": {"HF_TOKEN": "hf_topsecret", "WANDB_PROJECT": "demo"}})
    p = L.prepare_launch(r, root=tmp_path / "runs", gpu_count=0)
    L.render_files(p, python="/py")
    run = L.write_run(p)
    for f in run.dir.rglob("*"):
        if f.is_file():
            assert "hf_topsecret" not in f.read_text(), f
    assert p.secrets == {"HF_TOKEN": "hf_topsecret"} and p.spec.env["WANDB_PROJECT"] == "demo"
    assert yaml.safe_load(run.recipe_path.read_text())["cluster"]["env"]["HF_TOKEN"] == "<redacted>"


@needs_smoke
@pytest.mark.parametrize("over,match", [
    ({"cluster.nodes": 2}, "local provider runs on this machine only"),
    ({"train.precision": "fp16"}, "fp16 training needs a GPU"),
    ({"train.attn_implementation": "flash_attention_2"}, "FlashAttention needs a GPU"),
    ({"data.path": "/nonexistent/data.jsonl"}, "no such file"),
    ({"model": "/nonexistent/model"}, "config.json"),
])
def test_refusals(tmp_path, over, match):
    with pytest.raises(FtlError, match=match):
        L.prepare_launch(_recipe(tmp_path, **over), root=tmp_path / "runs", gpu_count=0)
    assert not (tmp_path / "runs").exists()


@needs_smoke
def test_more_gpus_than_present(tmp_path):
    with pytest.raises(FtlError, match="has 1 GPU"):
        L.prepare_launch(_recipe(tmp_path, **{"cluster.gpus_per_node": 4}), root=tmp_path / "runs", gpu_count=1)


@needs_smoke
def test_does_not_fit_names_shortfall_and_fixes(tmp_path):
    r = _recipe(tmp_path, **{"cluster.gpu": "l4", "train.micro_batch_size": 2048, "data.max_seq_len": 512, "method": "full"})
    with pytest.raises(FtlError) as e:
        L.prepare_launch(r, root=tmp_path / "runs", gpu_count=0)
    msg = str(e.value)
    assert "does not fit" in msg and "short by" in msg and "--set " in msg and "--force" in msg
    p = L.prepare_launch(r, root=tmp_path / "runs", gpu_count=0, force=True)
    assert any("--force" in w for w in p.warnings)


# --- resume -----------------------------------------------------------------------------------------


@needs_smoke
def test_prepare_resume(tmp_path):
    r = _recipe(tmp_path, **{"parallel.strategy": "zero2", "cluster.gpus_per_node": 2, "train.precision": "bf16"})
    p = L.prepare_launch(r, root=tmp_path / "runs", gpu_count=0)
    L.render_files(p, python="/py")
    run = L.write_run(p)
    run.update_state(status="stopped")
    with pytest.raises(FtlError, match="no complete checkpoint"):
        L.prepare_resume(run.id, root=tmp_path / "runs")
    _ckpt(run.dir, 3, True)
    _ckpt(run.dir, 6, False)
    q = L.prepare_resume(str(run.dir))
    assert q.resume_from == (run.dir / "checkpoints" / "checkpoint-3").resolve()
    assert q.plan.strategy == "zero2" and q.plan.world_size == 2
    L.render_files(q, python="/py")
    assert q.spec.argv[-2:] == ["--resume-from", str(q.resume_from)]
    assert q.files["deepspeed.json"] == run.deepspeed_path.read_text()  # the run's own config is kept
    L.write_run(q)
    assert run.state()["resumed_from"] == [str(q.resume_from)]
    assert "--resume-from" in run.command_path.read_text()
    run.update_state(status="completed")
    with pytest.raises(FtlError, match="already completed"):
        L.prepare_resume(run.id, root=tmp_path / "runs")
    run.update_state(status="running", launcher_pid=os.getpid())
    with pytest.raises(FtlError, match="still running"):
        L.prepare_resume(run.id, root=tmp_path / "runs")


# --- the CLI, without processes -----------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FTL_RUNS_DIR", raising=False)
    monkeypatch.setenv("FTL_NO_GPU_DETECT", "1")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@needs_smoke
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_dry_run_creates_nothing(cli, tmp_path, strategy):
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli("launch", SMOKE, "--dry-run", "--gpus-per-node", 2, "--set", f"parallel.strategy={strategy}",
              "--set", "train.precision=bf16")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    out = res.output
    assert "accelerate.yaml" in out and "command.sh" in out and "would create" in out and "estimate:" in out
    assert ("deepspeed.json" in out) is strategy.startswith("zero")
    assert "nothing was started or written" in out


@needs_smoke
def test_dry_run_json(cli, tmp_path):
    res = cli("launch", SMOKE, "--dry-run", "--json", "--gpus-per-node", 2, "--set", "parallel.strategy=zero2")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["dry_run"] is True and d["strategy"] == "zero2" and d["world_size"] == 2
    assert d["run_dir"].startswith(str(tmp_path / "runs")) and ID_RE.match(d["run_id"])
    assert d["plan"]["deepspeed_config"] == d["run_dir"] + "/deepspeed.json"
    assert json.loads(d["files"]["deepspeed.json"])["zero_optimization"]["stage"] == 2
    assert d["command"][-3:] == ["launcher.train", "--run-dir", d["run_dir"]]
    assert not (tmp_path / "runs").exists()


@needs_smoke
@pytest.mark.parametrize("args,match", [
    (["--set", "train.micro_batch_size=0"], "micro_batch_size"),
    (["--set", "data.path=/nonexistent.jsonl"], "no such file"),
    (["--set", "model=/nonexistent/model"], "config.json"),
    (["--set", "data.columns.instruction=prompt_text"], "no such column"),
    (["--nodes", "2"], "1 node"),
    (["--set", "cluster.gpu=l4", "--set", "train.micro_batch_size=2048", "--set", "data.max_seq_len=512",
      "--set", "method=full"], "does not fit"),
])
def test_cli_bad_inputs_one_line_exit_2(cli, tmp_path, args, match):
    res = cli("launch", SMOKE, *args)
    assert res.exit_code == 2, res.output
    assert match in res.output
    assert "Traceback" not in res.output
    assert res.output.strip().count("\n") == 0, res.output  # one line
    assert not (tmp_path / "runs").exists()


def test_cli_resume_errors(cli, tmp_path):
    res = cli("launch", "--resume", "nope")
    assert res.exit_code == 2 and "no run 'nope'" in res.output
    res = cli("launch")
    assert res.exit_code == 2 and "--resume" in res.output
    res = cli("launch", SMOKE, "--resume", "x")
    assert res.exit_code == 2 and "drop RECIPE" in res.output


def test_cli_runs_status_logs(cli, tmp_path):
    res = cli("runs")
    assert res.exit_code == 0 and "no runs" in res.output
    assert cli("status").exit_code == 2
    run = R.create_run_dir("demo run", tmp_path / "runs", NOW)
    F.write_json(run.state_path, {**R.initial_state(run, "demo run"), "status": "completed", "started": "2025-03-04T05:06:07+00:00"})
    F.write_json(run.plan_path, {"strategy": "ddp", "world_size": 1, "device": "cpu"})
    run.metrics_path.write_text('{"step": 5, "loss": 1.25}\n')
    run.log_path.write_text("hello\nworld\n")
    _ckpt(run.dir, 5, True)
    res = cli("runs", "--json")
    rows = json.loads(res.stdout)
    assert rows[0]["id"] == run.id and rows[0]["status"] == "completed" and rows[0]["step"] == 5
    assert cli("ps").exit_code == 0 and run.id in cli("ps").output
    res = cli("status", "--json")
    d = json.loads(res.stdout)
    assert d["state"]["status"] == "completed" and d["checkpoint"].endswith("checkpoint-5")
    assert cli("status", run.id).exit_code == 0
    res = cli("logs", run.id)
    assert res.exit_code == 0 and res.output == "hello\nworld\n"
    res = cli("logs", run.id, "--follow")  # the run is over: prints and returns
    assert res.exit_code == 0 and res.output == "hello\nworld\n"
    res = cli("stop", run.id)
    assert res.exit_code == 2 and "not running" in res.output


def test_estimate_and_catalog_commands_still_work(cli):
    assert cli("version").exit_code == 0
    assert cli("gpus").exit_code == 0
    assert cli("models", "--json").exit_code == 0
    res = cli("estimate", ROOT / "recipes" / "llama3-8b-qlora.yaml", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["recipe"]
