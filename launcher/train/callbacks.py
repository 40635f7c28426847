"""Trainer callbacks: metrics.jsonl, COMPLETE markers, SIGTERM stop-and-save, per-rank shard reports, progress."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("ftl.train")


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item"):
        try:
            return _clean(v.item())
        except Exception:  # noqa: BLE001
            return str(v)
    return v


# the log line's keys, in this order (everything else is in metrics.jsonl); eval_* metrics are added after them
LINE_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm")
SHORT = {"learning_rate": "lr"}


def log_line(step: int, max_steps: int, epoch: float | None, logs: dict[str, Any]) -> str:
    """One compact line per log event (fits 80 columns): step/total, epoch, loss, eval metrics, lr, grad norm."""
    parts = [f"step {step}/{max_steps}"]
    if isinstance(epoch, (int, float)):
        parts.append(f"epoch {epoch:.2f}")
    keys = [k for k in LINE_KEYS if k in logs] + sorted(k for k in logs if k.startswith("eval_") and k not in LINE_KEYS
                                                        and not k.endswith(("_runtime", "_per_second", "_entropy", "num_tokens")))
    for k in keys:
        v = logs[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{SHORT.get(k, k)} {v:.4g}")
    if "train_runtime" in logs:
        parts.append(f"train_loss {logs.get('train_loss', float('nan')):.4g}  runtime {logs['train_runtime']:.1f} s")
    return "  ".join(parts)


class MetricsFile(TrainerCallback):
    """One JSON object per log/eval event in RUN_DIR/metrics.jsonl (main process, with max_steps), plus a
    compact log line. The live view (bar, ETA) is drawn by the launcher from metrics.jsonl, on every backend."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        rec = {"time": round(time.time(), 3), "step": state.global_step, "max_steps": state.max_steps,
               "epoch": _clean(state.epoch)}
        rec.update({k: _clean(v) for k, v in logs.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(log_line(state.global_step, state.max_steps, state.epoch, logs), flush=True)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop the records of steps after the checkpoint (they are trained again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(x + "\n" for x in keep))


class CompleteMarker(TrainerCallback):
    """After every rank has finished writing a checkpoint, the main process puts an empty COMPLETE file in it."""

    def __init__(self):
        self.saved: list[str] = []

    def on_save(self, args, state, control, **kw):
        _barrier()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            (ckpt / "COMPLETE").touch()
            self.saved.append(str(ckpt))
            log.info("checkpoint %s complete", ckpt)
        _barrier()


class StopAndSave(TrainerCallback):
    """SIGTERM -> save a checkpoint and stop at the next step boundary (resumable); also always save at the end.

    SIGUSR1/SIGUSR2 mean the same: SLURM sends them to every process of a job step before its time limit
    or on preemption (submitit asks for USR2), and their default action would kill the rank unsaved.
    Ranks agree on the flag (a max all-reduce each step), so a signal that reaches one rank stops them all."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, device):
        self.requested = False
        self.stopped_by_signal = False
        self.device = device
        self._previous: dict[int, object] = {}
        self.last_saved_step = -1

    def install(self) -> None:
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread
            pass

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame):
        if not self.requested:
            # SIGTERM is how ftl asks (Ctrl-C, ftl cancel, a budget): not named, since the user pressed no SIGTERM
            why = "stop requested" if signum == signal.SIGTERM else signal.Signals(signum).name
            print(f"[ftl] {why}: saving a checkpoint and stopping after this step", file=sys.stderr, flush=True)
        self.requested = True

    def _agreed(self) -> bool:
        import torch.distributed as dist

        flag = self.requested
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def on_step_end(self, args, state, control, **kw):
        if self._agreed():
            self.requested = True
            self.stopped_by_signal = True
            control.should_save = True
            control.should_training_stop = True
        elif state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True  # always a checkpoint at the end
        return control

    def on_save(self, args, state, control, **kw):
        self.last_saved_step = state.global_step

    def on_epoch_end(self, args, state, control, **kw):
        if self.last_saved_step == state.global_step:
            control.should_save = False  # this step's checkpoint is written (and COMPLETE); do not rewrite it
        return control


class ShardReport(TrainerCallback):
    """Every rank writes RUN_DIR/shards/rank-<k>.json after its first optimizer step."""

    def __init__(self, run_dir: Path, strategy: str, world_size: int):
        self.run_dir, self.strategy, self.world_size = run_dir, strategy, world_size
        self.trainer = None
        self.probe = None
        self.done = False

    def on_train_begin(self, args, state, control, **kw):
        from launcher.train.shards import ShardProbe

        tr = self.trainer
        if tr is None or tr.optimizer is None:
            return
        engine_opt = getattr(tr.model_wrapped, "optimizer", None) if self.strategy.startswith("zero") else None
        try:
            self.probe = ShardProbe(tr.model_wrapped, tr.optimizer, engine_opt, self.strategy)
        except Exception as e:  # noqa: BLE001 - measuring must never stop training
            log.warning("shard report disabled: %s", e)

    def on_step_end(self, args, state, control, **kw):
        if self.done or self.probe is None:
            return
        from launcher.train.shards import write_rank_report

        self.done = True
        try:
            import torch.distributed as dist

            tr = self.trainer
            rep = self.probe.report()
            rep.update(rank=args.process_index, world_size=self.world_size, strategy=self.strategy,
                       distributed_type=getattr(tr.accelerator.distributed_type, "name", str(tr.accelerator.distributed_type)),
                       backend=dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
                       mixed_precision=tr.accelerator.mixed_precision, step=state.global_step,
                       process_group_size=dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
                       node_rank=int(os.environ.get("GROUP_RANK") or 0),
                       node=os.environ.get("SLURMD_NODENAME") or os.environ.get("FTL_NODE_NAME") or socket.gethostname())
            write_rank_report(self.run_dir, args.process_index, rep)
        except Exception as e:  # noqa: BLE001
            log.warning("shard report failed: %s", e)
        finally:
            self.probe.close()
