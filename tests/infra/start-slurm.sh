#!/usr/bin/env bash
# Start a private 2-node SLURM cluster (munged + slurmctld + slurmd node1/node2) on this one
# host, as root, for the tests (fixture slurm_cluster in tests/multinode.py). Usage:
#   start-slurm.sh [RUN_DIR]        (default: a new mktemp dir under /tmp)
# Env overrides: MN_CTLD_PORT (controller port), MN_NODE_PORT (node1's slurmd port; node2 uses +1),
# MN_WAIT_S (default 60). Without overrides, free random ports are picked, so two test sessions on
# one machine do not collide. Keep RUN_DIR short: munge and slurmd put unix sockets in it (path
# limit 107 bytes). /etc/munge and /etc/slurm are not touched; nothing listens beyond 127.0.0.1.
# Prints RUN_DIR on the last line of stdout; `source RUN_DIR/env.sh` (sets SLURM_CONF) before using
# sinfo/srun/sbatch. Stop with stop-slurm.sh RUN_DIR (by PID; also kills the jobs' processes).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${1:-$(mktemp -d /tmp/ftlslurm.XXXXXX)}"
DIR="$(mkdir -p "$DIR" && cd "$DIR" && pwd)"
port_busy() {  # something listens on / uses port $1 (ss from iproute2; else try to connect)
  if command -v ss >/dev/null; then ss -Htan "sport = :$1" 2>/dev/null | grep -q .
  else (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; fi
}
if [ -n "${MN_CTLD_PORT:-}${MN_NODE_PORT:-}" ]; then
  CTLD_PORT="${MN_CTLD_PORT:-16817}"; PORT1="${MN_NODE_PORT:-17001}"
else
  while :; do  # random, outside the usual ephemeral range (32768-60999)
    CTLD_PORT=$((20000 + RANDOM % 12000)); PORT1=$((CTLD_PORT + 1))
    port_busy "$CTLD_PORT" || port_busy "$PORT1" || port_busy $((PORT1 + 1)) || break
  done
fi
PORT2=$((PORT1 + 1))
WAIT_S="${MN_WAIT_S:-60}"
HOST="$(hostname)"
# RealMemory: what this machine has, less a margin (memory is not a consumed resource: CR_Core);
# jobs that ask no --mem (the default in the tests) always fit
MEM_MB=$(awk '/^MemTotal:/ {m = int($2 / 1024 * 0.9); print (m > 256 ? m : 256)}' /proc/meminfo)
t0=$(date +%s.%N)

for b in munged mungekey munge unmunge slurmctld slurmd sinfo; do
  command -v "$b" >/dev/null || { echo "missing $b: apt-get install -y slurmd slurmctld slurm-client munge" >&2; exit 1; }
done
mkdir -p "$DIR"/{munge,state,spool,run,log}
chmod 700 "$DIR/munge"

fail() {
  echo "start-slurm.sh: $*" >&2
  for f in "$DIR"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
  exit 1
}

# --- munge: private key + socket -------------------------------------------
[ -s "$DIR/munge/munge.key" ] || mungekey -c -k "$DIR/munge/munge.key"
chmod 600 "$DIR/munge/munge.key"
munged -f --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
  --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
  --seed-file="$DIR/munge/munged.seed" || fail "munged did not start"
for _ in $(seq 50); do [ -S "$DIR/munge/munge.socket" ] && break; sleep 0.1; done
munge -S "$DIR/munge/munge.socket" -n | unmunge -S "$DIR/munge/munge.socket" >/dev/null \
  || fail "munge round trip failed"

# --- slurm.conf + gres.conf -------------------------------------------------
sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
    -e "s|@PORT1@|$PORT1|g" -e "s|@PORT2@|$PORT2|g" -e "s|@MEM_MB@|$MEM_MB|g" \
    "${MN_SLURM_TEMPLATE:-$HERE/slurm.conf.template}" > "$DIR/slurm.conf"
# slurmd reads gres.conf from slurm.conf's folder; the fake GPUs' "device files" live in DIR
sed -e "s|@DIR@|$DIR|g" "$HERE/gres.conf" > "$DIR/gres.conf"
for i in 0 1; do
  [ -e "$DIR/fakegpu$i" ] || mknod "$DIR/fakegpu$i" c 1 3 2>/dev/null || : > "$DIR/fakegpu$i"
done
export SLURM_CONF="$DIR/slurm.conf"
printf 'export SLURM_CONF=%q\n' "$SLURM_CONF" > "$DIR/env.sh"

# --- daemons (they fork; PIDs land in $DIR/run/*.pid) -------------------------
slurmctld -f "$SLURM_CONF" -c -i || fail "slurmctld did not start"
for n in node1 node2; do
  mkdir -p "$DIR/spool/$n"
  slurmd -f "$SLURM_CONF" -N "$n" || fail "slurmd $n did not start"
done

# --- wait until both nodes are idle ------------------------------------------
deadline=$(( $(date +%s) + WAIT_S ))
until [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2=="idle"' | sort -u | wc -l)" -eq 2 ]; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    sinfo -N -l >&2 || true
    fail "cluster not idle after ${WAIT_S}s"
  fi
  sleep 0.2
done
t1=$(date +%s.%N)
echo "slurm up in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')s (SLURM_CONF=$SLURM_CONF)" >&2
echo "$DIR"
