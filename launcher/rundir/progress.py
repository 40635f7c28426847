"""A run's progress from its files (metrics.jsonl, state.json, result.json): step/total, elapsed, ETA, loss.

One reading for the live view of `ftl launch` and `ftl logs -f`, and for `ftl ps` and `ftl status`. It works
for every backend because rank 0 writes metrics.jsonl into the run directory wherever the run executes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from launcher.core.files import iso_epoch
from launcher.rundir.run import read_metrics

SMOOTH_LAST = 5  # the shown loss is the mean of this many last logged losses


@dataclass
class RunProgress:
    step: int | None = None
    total: int | None = None
    epoch: float | None = None
    loss: float | None = None  # the mean of the last SMOOTH_LAST logged training losses
    last_loss: float | None = None  # the last logged training loss (the final loss of a finished run)
    eval_loss: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def summarize(records: Iterable[dict[str, Any]], state: dict[str, Any] | None = None,
              result: dict[str, Any] | None = None, now: float | None = None) -> RunProgress:
    """Progress from the metrics records, the state and the result (pure: the tests give all three)."""
    state, result = state or {}, result or {}
    now = time.time() if now is None else now
    p = RunProgress()
    losses: list[float] = []
    steps: list[tuple[float, int, float | None]] = []  # (time, step, num_tokens) of training log records
    for r in records:
        step, t = r.get("step"), _num(r.get("time"))
        if isinstance(step, int):
            p.step = max(p.step or 0, step)
        if isinstance(r.get("max_steps"), int) and r["max_steps"] > 0:
            p.total = r["max_steps"]
        if _num(r.get("epoch")) is not None:
            p.epoch = _num(r["epoch"])
        if _num(r.get("loss")) is not None:
            losses.append(float(r["loss"]))
            if t is not None and isinstance(step, int):
                steps.append((t, step, _num(r.get("num_tokens"))))
        if _num(r.get("eval_loss")) is not None:
            p.eval_loss = _num(r["eval_loss"])
    if isinstance(result.get("global_step"), int):
        p.step = result["global_step"]
    if isinstance(result.get("max_steps"), int) and result["max_steps"] > 0:
        p.total = result["max_steps"]
    if losses:
        p.last_loss = losses[-1]
        tail = losses[-SMOOTH_LAST:]
        p.loss = sum(tail) / len(tail)
    if _num(result.get("final_loss")) is not None:
        p.last_loss = _num(result["final_loss"])
    if isinstance(result.get("eval"), dict) and _num(result["eval"].get("eval_loss")) is not None:
        p.eval_loss = _num(result["eval"]["eval_loss"])

    started, ended = iso_epoch(state.get("started")), iso_epoch(state.get("ended"))
    if started is not None:
        p.elapsed_s = max(0.0, (ended if ended is not None else now) - started)
    if len(steps) >= 2 and steps[-1][1] > steps[0][1]:
        (t0, s0, n0), (t1, s1, n1) = steps[0], steps[-1]
        per_step = (t1 - t0) / (s1 - s0)
        if n0 is not None and n1 is not None and t1 > t0:
            p.tokens_per_s = (n1 - n0) / (t1 - t0)
    elif steps and started is not None and steps[-1][1] > 0:
        per_step = max(0.0, steps[-1][0] - started) / steps[-1][1]  # start-up included: a pessimistic first guess
    else:
        per_step = None
    if ended is None and per_step is not None and p.step is not None and p.total:
        since_last = max(0.0, now - steps[-1][0]) if steps else 0.0
        p.eta_s = max(0.0, per_step * (p.total - p.step) - since_last)
    return p


def run_progress(run: Any, state: dict[str, Any] | None = None, now: float | None = None) -> RunProgress:
    """A run's progress (run: a launcher.rundir.Run); state, when given, is the backend's view of state.json."""
    return summarize(read_metrics(run.metrics_path), run.state() if state is None else state, run.result(), now)
