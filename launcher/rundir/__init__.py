"""The run directory: the one place a run's state lives, shared by the launcher, its backends and the trainer.

`run` holds the layout, ids, state.json, checkpoints and metrics; `cost` what a run cost beside its estimate.
"""

from launcher.rundir.run import (ACTIVE, CHECKPOINT_RE, COMPLETE_MARKER, STATUSES, Run, RunError, checkpoints,
                                 create_run_dir, find_run, initial_state, is_valid_run_id, last_metrics, list_runs,
                                 local_status, newest_complete_checkpoint, newest_run, next_run_id, read_metrics,
                                 run_id_base, runs_root, slug, timestamp)

__all__ = ["ACTIVE", "CHECKPOINT_RE", "COMPLETE_MARKER", "STATUSES", "Run", "RunError", "checkpoints", "create_run_dir",
           "find_run", "initial_state", "is_valid_run_id", "last_metrics", "list_runs", "local_status",
           "newest_complete_checkpoint", "newest_run", "next_run_id", "read_metrics", "run_id_base", "runs_root",
           "slug", "timestamp"]
