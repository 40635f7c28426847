#!/usr/bin/env bash
# Stop the sshd's that start-sshd.sh RUN_DIR started (by PID). Usage: stop-sshd.sh RUN_DIR [--rm]
set -uo pipefail
DIR="${1:?usage: stop-sshd.sh RUN_DIR [--rm]}"
# alive PID -> true if PID runs (a zombie counts as gone: PID 1 may reap it only seconds later)
alive() { local s; s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1; s="${s##*) }"; [ "${s%% *}" != Z ]; }
for f in "$DIR"/sshd-*.pid; do
  [ -s "$f" ] || continue
  p="$(cat "$f")"
  if [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' < "/proc/$p/cmdline" | grep -q "sshd"; then
    kill -TERM "$p" 2>/dev/null
    for _ in $(seq 50); do alive "$p" || break; sleep 0.1; done
    alive "$p" && kill -KILL "$p" 2>/dev/null
  fi
  rm -f "$f"
done
[ "${2:-}" = "--rm" ] && rm -rf "$DIR"
exit 0
