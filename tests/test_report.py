"""Cost report after a run: RUN_DIR/cost.json written when a run ends, and `ftl report RUN` (estimate vs actual)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher import rundir as R
from launcher.core import files as F
from launcher.rundir.cost import build_cost, report, write_cost

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"


def _cli(*args, runs_dir: Path, timeout: float = 300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "MASTER_")) and
           k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(FTL_NO_GPU_DETECT="1", FTL_RUNS_DIR=str(runs_dir), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def _fake_run(tmp_path: Path, device="cuda", world=8, price=2.5, peak_in=None, metrics=True) -> R.Run:
    """A finished run directory as the local backend and the trainer leave it (no training)."""
    d = tmp_path / "runs" / "r-20260101-000000"
    d.mkdir(parents=True)
    run = R.Run(d.name, d)
    est = {"world_size": world, "steps": 100, "step_time_s": 2.0, "total_time_s": 200.0,
           "cost_usd": 200.0 / 3600 * world * price, "price_per_gpu_hour": price,
           "per_device": {"peak_bytes": 40 * 1024**3}, "gpu": {"key": "h100-sxm"}}
    F.write_json(run.plan_path, {"strategy": "zero3", "world_size": world, "device": device, "estimate": est})
    run.recipe_path.write_text(yaml.safe_dump({"name": "x", "cluster": {"price_per_gpu_hour": price,
                                                                       "price_source": "test rate"}}))
    F.write_json(run.state_path, {"run_id": run.id, "status": "completed", "started": "2026-01-01T00:00:00+00:00",
                                  "ended": "2026-01-01T00:05:00+00:00"})
    if metrics:
        lines = [{"time": 1000.0 + 2.5 * s, "step": s, "loss": 1.0 / s} for s in range(1, 101)]
        lines.append({"time": 1300.0, "step": 100, "train_runtime": 250.0, "train_loss": 0.1})
        run.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in lines))
    F.write_json(run.result_path, {"status": "completed", "global_step": 100, "train_runtime_s": 250.0,
                                   **({"peak_memory_bytes": peak_in} if peak_in else {})})
    return run


def test_cost_on_gpus_with_ratios(tmp_path):
    run = _fake_run(tmp_path, peak_in=44 * 1024**3)
    d = build_cost(run)
    a, p, r = d["actual"], d["predicted"], d["ratio_actual_over_predicted"]
    assert a["wall_s"] == 300.0 and d["gpus"] == 8 and d["processes"] == 8 and d["device"] == "cuda"
    assert a["gpu_hours"] == pytest.approx(300 / 3600 * 8)
    assert a["cost_usd"] == pytest.approx(a["gpu_hours"] * 2.5)  # cost = GPU-hours x price, exactly
    assert d["price_source"] == "test rate"
    assert a["step_time_s"] == pytest.approx(2.5) and a["step_time_from"] == "train_runtime / steps"
    assert r["step_time"] == pytest.approx(1.25) and r["total_time"] == pytest.approx(1.5)
    assert r["cost"] == pytest.approx(1.5) and r["gpu_hours"] == pytest.approx(1.5)
    assert a["peak_memory_bytes"] == 44 * 1024**3 and a["peak_memory_from"] == "result.json"
    assert r["peak_memory"] == pytest.approx(1.1)
    assert p["peak_memory_bytes"] == 40 * 1024**3


def test_cost_on_cpu_has_no_gpu_hours_and_null_peak(tmp_path):
    run = _fake_run(tmp_path, device="cpu", world=2, price=0.0)
    d = build_cost(run)
    assert d["gpus"] == 0 and d["processes"] == 2 and d["device"] == "cpu"
    assert d["actual"]["gpu_hours"] == 0 and d["actual"]["cost_usd"] == 0
    assert d["actual"]["peak_memory_bytes"] is None and d["ratio_actual_over_predicted"]["peak_memory"] is None


def test_step_time_from_timestamps_and_peak_from_shards(tmp_path):
    run = _fake_run(tmp_path, metrics=False)
    F.write_json(run.result_path, {"status": "completed", "global_step": 4})
    run.metrics_path.write_text("".join(json.dumps({"time": 10.0 + 3 * s, "step": s, "loss": 1.0}) + "\n" for s in range(1, 5)))
    (run.dir / "shards").mkdir()
    for k, peak in enumerate((5, 7)):
        (run.dir / "shards" / f"rank-{k}.json").write_text(json.dumps({"rank": k, "peak_allocated_bytes": peak * 2**30}))
    d = build_cost(run)
    assert d["actual"]["step_time_s"] == pytest.approx(3.0) and d["actual"]["step_time_from"] == "metric timestamps"
    assert d["actual"]["peak_memory_bytes"] == 7 * 2**30 and d["actual"]["peak_memory_from"] == "shards/rank-1.json"


def test_report_reads_cost_json_and_cli(tmp_path):
    run = _fake_run(tmp_path)
    write_cost(run)
    assert json.loads((run.dir / "cost.json").read_text())["actual"]["wall_s"] == 300.0
    assert report(run)["written"] == json.loads((run.dir / "cost.json").read_text())["written"]
    res = _cli("report", run.id, "--json", runs_dir=tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ratio_actual_over_predicted"]["cost"] == pytest.approx(1.5)
    res = _cli("report", str(run.dir), runs_dir=tmp_path / "elsewhere")
    assert res.returncode == 0, res.stderr
    for word in ("peak memory per device", "step time", "total time", "GPU-hours", "cost", "1.50×", "not recorded"):
        assert word in res.stdout, (word, res.stdout)
    res = _cli("report", "nope", runs_dir=tmp_path / "runs")
    assert res.returncode == 2 and "no run 'nope'" in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(not SMOKE.is_file(), reason="recipes/smoke.yaml not present")
def test_smoke_launch_writes_cost_json(tmp_path):
    runs_dir = tmp_path / "runs"
    res = _cli("launch", SMOKE, runs_dir=runs_dir)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    (run,) = R.list_runs(runs_dir)
    cost = json.loads((run.dir / "cost.json").read_text())
    st = run.state()
    assert cost["status"] == "completed" and cost["ended"] == st["ended"] and cost["started"] == st["started"]
    assert cost["device"] == "cpu" and cost["processes"] == 1 and cost["gpus"] == 0
    a = cost["actual"]
    assert a["wall_s"] > 0 and a["gpu_hours"] == 0 and a["cost_usd"] == 0 and a["steps"] == 6
    assert a["step_time_s"] and 0 < a["step_time_s"] < a["wall_s"]
    assert a["peak_memory_bytes"] is None  # the trainer records no peak on the CPU
    assert cost["predicted"]["peak_memory_bytes"] > 0 and cost["predicted"]["steps"] == 6
    d = json.loads(_cli("report", run.id, "--json", runs_dir=runs_dir).stdout)
    assert d == cost
    res = _cli("report", run.id, runs_dir=runs_dir)
    assert res.returncode == 0 and "step time" in res.stdout and run.id in res.stdout
