#!/usr/bin/env bash
# Stop what start-slurm.sh RUN_DIR started, by PID only (never by name), including the processes
# of jobs still running on it. Usage: stop-slurm.sh RUN_DIR [--rm]
set -uo pipefail
DIR="${1:?usage: stop-slurm.sh RUN_DIR [--rm]}"
DIR="$(cd "$DIR" 2>/dev/null && pwd)" || exit 0
export SLURM_CONF="$DIR/slurm.conf"

# alive PID -> true if PID runs (a zombie counts as gone: PID 1 may reap it only seconds later)
alive() { local s; s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1; s="${s##*) }"; [ "${s%% *}" != Z ]; }
ours() {  # ours PID -> true if PID is alive and its cmdline matches one of our daemons
  [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' < "/proc/$1/cmdline" | grep -qE 'slurmctld|slurmd|munged'
}
# 1. cancel jobs while the controller still runs, so steps end cleanly
ctld="$(cat "$DIR/run/slurmctld.pid" 2>/dev/null || true)"
if [ -n "$ctld" ] && ours "$ctld"; then
  jobs="$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
  if [ -n "${jobs// /}" ]; then
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 100); do [ -z "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi
# 2. slurmstepd's of this cluster (their cwd is under RUN_DIR) + their process trees
steps=()
for p in $(pgrep -x slurmstepd 2>/dev/null); do
  case "$(readlink "/proc/$p/cwd" 2>/dev/null)" in "$DIR"/*) steps+=("$p");; esac
done
# ... and job processes that left that tree (setsid/nohup/daemonized): every job process carries
# SLURM_JOB_ID and this cluster's SLURM_CONF in its environment (never this script or its callers)
skip=" $$ $PPID "
for p in /proc/[0-9]*; do
  p="${p#/proc/}"
  case "$skip" in *" $p "*) continue;; esac
  env_of="$( { tr '\0' '\n' < "/proc/$p/environ"; } 2>/dev/null)" || continue
  if grep -qxF "SLURM_CONF=$SLURM_CONF" <<<"$env_of" && grep -q '^SLURM_JOB_ID=' <<<"$env_of"; then
    steps+=("$p")
  fi
done
# 3. daemons by pid file
pids=()
for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
  [ -s "$f" ] || continue
  p="$(cat "$f")"
  ours "$p" && kill -TERM "$p" 2>/dev/null && pids+=("$p")
done
if [ ${#steps[@]} -gt 0 ]; then
  tree=("${steps[@]}"); frontier=("${steps[@]}")
  while [ ${#frontier[@]} -gt 0 ]; do
    next=()
    for p in "${frontier[@]}"; do for c in $(pgrep -P "$p" 2>/dev/null); do next+=("$c"); done; done
    tree+=("${next[@]}"); frontier=("${next[@]}")
  done
  kill -KILL "${tree[@]}" 2>/dev/null
fi
for _ in $(seq 100); do
  up=0; for p in "${pids[@]}"; do alive "$p" && up=1; done
  [ "$up" = 0 ] && break; sleep 0.1
done
for p in "${pids[@]}"; do alive "$p" && kill -KILL "$p" 2>/dev/null; done
[ "${2:-}" = "--rm" ] && rm -rf "$DIR"
exit 0
