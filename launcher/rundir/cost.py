"""What a run cost and how it compared with its estimate: RUN_DIR/cost.json and `ftl report RUN`.

cost.json is written by the backend when a run ends (and rebuilt on the fly by `ftl report` for runs
that ended before the hook existed or are still running). Sources:

* wall time: state.json `started` -> `ended` (a resumed run keeps its first `started`, so the wall
  time includes the pause between sessions);
* GPU-hours: wall hours × world size on GPUs; 0 on the CPU (the process count and device are recorded);
* cost: GPU-hours × the run's profile price (recipe.yaml cluster.price_per_gpu_hour);
* measured step time: the trainer's train_runtime / steps trained (metrics.jsonl or result.json), else
  the spacing of the per-step metric timestamps;
* measured peak memory: a peak the trainer recorded (result.json, metrics.jsonl or shards/rank-*.json,
  the largest over ranks), else null;
* predictions: the estimate in plan.json (step time, total time, cost, peak bytes per device).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import yaml

from launcher.core.files import iso_epoch, read_json, write_json
from launcher.rundir.run import Run, read_metrics

PEAK_KEYS = ("peak_memory_bytes", "peak_allocated_bytes", "max_memory_allocated_bytes", "max_memory_allocated",
             "peak_reserved_bytes", "max_memory_reserved")


def spend(instances: list[dict[str, Any]], now: float | None = None) -> float:
    """USD so far of rented instances: each one's hourly price x the time since the provider created it (until
    it was terminated)."""
    now = time.time() if now is None else now
    total = 0.0
    for i in instances:
        start = iso_epoch(i.get("created_at"))
        if start is None or not i.get("price_per_hour"):
            continue
        end = iso_epoch(i.get("terminated_at")) or now
        total += float(i["price_per_hour"]) * max(0.0, end - start) / 3600
    return total


def _ratio(actual: float | None, predicted: float | None) -> float | None:
    if actual is None or not predicted:
        return None
    return round(actual / predicted, 4)


def _peak_from(d: Any) -> int | None:
    if not isinstance(d, dict):
        return None
    for k in PEAK_KEYS:
        v = d.get(k)
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
    for sub in ("memory", "cuda_memory"):
        v = _peak_from(d.get(sub))
        if v:
            return v
    return None


def measured_peak(run: Run) -> tuple[int | None, str | None]:
    """The largest peak memory the trainer recorded (bytes per device), and where it was found."""
    best: tuple[int | None, str | None] = (None, None)

    def take(v: int | None, where: str) -> None:
        nonlocal best
        if v and (best[0] is None or v > best[0]):
            best = (v, where)

    take(_peak_from(run.result()), "result.json")
    if run.metrics_path.is_file():
        for m in read_metrics(run.metrics_path):
            take(_peak_from(m), "metrics.jsonl")
    shards = run.dir / "shards"
    if shards.is_dir():
        for f in sorted(shards.glob("rank-*.json")):
            try:
                take(_peak_from(json.loads(f.read_text())), f"shards/{f.name}")
            except (OSError, json.JSONDecodeError):
                continue
    return best


def measured_step_time(run: Run) -> tuple[float | None, int | None, str | None]:
    """(seconds per optimizer step, steps trained, how it was measured)."""
    metrics = list(read_metrics(run.metrics_path)) if run.metrics_path.is_file() else []
    result = run.result() or {}
    steps = result.get("global_step") or max((int(m.get("step") or 0) for m in metrics), default=0) or None
    runtime = next((m["train_runtime"] for m in reversed(metrics) if isinstance(m.get("train_runtime"), (int, float))), None)
    if runtime is None and isinstance(result.get("train_runtime_s"), (int, float)):
        runtime = result["train_runtime_s"]
    first_step = 0
    if runtime is not None and steps:
        if result.get("resumed_from"):  # train_runtime covers only the last session's steps
            ckpt = str(result["resumed_from"]).rstrip("/").rsplit("-", 1)[-1]
            first_step = int(ckpt) if ckpt.isdigit() else 0
        trained = steps - first_step
        if trained > 0:
            return runtime / trained, steps, "train_runtime / steps"
    logged = sorted({int(m["step"]): float(m["time"]) for m in metrics
                     if "loss" in m and isinstance(m.get("time"), (int, float)) and m.get("step")}.items())
    if len(logged) >= 2 and logged[-1][0] > logged[0][0]:
        return (logged[-1][1] - logged[0][1]) / (logged[-1][0] - logged[0][0]), steps, "metric timestamps"
    return None, steps, None


def _price(run: Run, est: dict[str, Any]) -> tuple[float, str | None]:
    try:
        cluster = (yaml.safe_load(run.recipe_path.read_text()) or {}).get("cluster") or {}
    except (OSError, yaml.YAMLError):
        cluster = {}
    if isinstance(cluster, dict) and cluster.get("price_per_gpu_hour") is not None:
        return float(cluster["price_per_gpu_hour"]), cluster.get("price_source") or "cluster profile"
    return float(est.get("price_per_gpu_hour") or 0), "estimate"


def build_cost(run: Run) -> dict[str, Any]:
    st = run.state()
    plan = run.plan()
    est = plan.get("estimate") or {}
    device = plan.get("device") or "cpu"
    world = int(plan.get("world_size") or est.get("world_size") or 1)
    t0, t1 = iso_epoch(st.get("started")), iso_epoch(st.get("ended"))
    wall = round(t1 - t0, 3) if t0 is not None and t1 is not None else None
    gpus = world if device == "cuda" else 0
    gpu_hours = round(wall / 3600 * gpus, 6) if wall is not None else None
    price, price_source = _price(run, est)
    cost = round(gpu_hours * price, 6) if gpu_hours is not None else None
    cost_from = "GPU-hours × price"
    if st.get("instances"):  # rented: what the provider bills, from each instance's creation to its termination
        cost, cost_from = round(spend(st["instances"]), 6), "rented instances: price × time from creation to termination"
    step_s, steps, step_how = measured_step_time(run)
    peak, peak_where = measured_peak(run)
    pd = est.get("per_device") or {}
    p_total = est.get("total_time_s")
    p_gpu_hours = round(p_total / 3600 * gpus, 6) if p_total is not None else None
    predicted = {
        "step_time_s": est.get("step_time_s"),
        "total_time_s": p_total,
        "steps": est.get("steps"),
        "gpu_hours": p_gpu_hours,
        "cost_usd": est.get("cost_usd"),
        "peak_memory_bytes": pd.get("peak_bytes"),
        "gpu": (est.get("gpu") or {}).get("key"),
    }
    actual = {
        "wall_s": wall,
        "step_time_s": round(step_s, 6) if step_s is not None else None,
        "step_time_from": step_how,
        "steps": steps,
        "gpu_hours": gpu_hours,
        "cost_usd": cost,
        "cost_from": cost_from,
        "peak_memory_bytes": peak,
        "peak_memory_from": peak_where,
    }
    ratios = {
        "step_time": _ratio(actual["step_time_s"], predicted["step_time_s"]),
        "total_time": _ratio(wall, p_total),
        "gpu_hours": _ratio(gpu_hours, p_gpu_hours),
        "cost": _ratio(cost, predicted["cost_usd"]),
        "peak_memory": _ratio(peak, predicted["peak_memory_bytes"]),
    }
    return {
        "run_id": run.id,
        "status": st.get("status"),
        "started": st.get("started"),
        "ended": st.get("ended"),
        "device": device,
        "processes": world,
        "gpus": gpus,
        "strategy": plan.get("strategy"),
        "price_per_gpu_hour": price,
        "price_source": price_source,
        "predicted": predicted,
        "actual": actual,
        "ratio_actual_over_predicted": ratios,
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def cost_path(run: Run) -> Path:
    return run.dir / "cost.json"


def write_cost(run: Run) -> dict[str, Any]:
    """The hook the backend calls when a run ends."""
    d = build_cost(run)
    write_json(cost_path(run), d)
    return d


def report(run: Run) -> dict[str, Any]:
    """cost.json if the run ended after it was written, else computed now (not written)."""
    d = read_json(cost_path(run), default=None)
    st = run.state()
    if d and d.get("ended") == st.get("ended") and d.get("ended"):
        return d
    return build_cost(run)
