#!/usr/bin/env bash
# Start N throw-away sshd "hosts" on loopback, one per [ADDR:]PORT, as root (fixture ssh_hosts in
# tests/multinode.py). The system sshd and /etc/ssh are not touched.
# Usage: start-sshd.sh RUN_DIR [[ADDR:]PORT ...]   (default: 2201 2202 on 127.0.0.1)
#   e.g. start-sshd.sh /tmp/x 127.0.0.2:2222 127.0.0.3:2222  -> distinct addresses,
#   same port, all on lo (any 127.x.y.z works without extra setup).
# Creates in RUN_DIR: client key id_ed25519, per-host host keys + sshd configs,
# sshd-hostN.pid, and ssh_config with aliases host1, host2, ... so that
#   ssh -F RUN_DIR/ssh_config host1 'echo $MN_SSH_HOST'   -> host1
# Stop with stop-sshd.sh RUN_DIR.
set -euo pipefail
DIR="${1:?usage: start-sshd.sh RUN_DIR [PORT ...]}"; shift || true
PORTS=("$@"); [ ${#PORTS[@]} -gt 0 ] || PORTS=(2201 2202)
SSHD="${MN_SSHD:-/usr/sbin/sshd}"
ADDR="${MN_SSH_ADDR:-127.0.0.1}"
[ -x "$SSHD" ] || { echo "missing $SSHD: apt-get install -y openssh-server" >&2; exit 1; }
mkdir -p "$DIR"; DIR="$(cd "$DIR" && pwd)"; chmod 700 "$DIR"
mkdir -p /run/sshd && chmod 755 /run/sshd          # privilege-separation dir sshd insists on
[ -f "$DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C mn-test -f "$DIR/id_ed25519"
cp "$DIR/id_ed25519.pub" "$DIR/authorized_keys"; chmod 600 "$DIR/authorized_keys"
: > "$DIR/ssh_config"
i=0
for spec in "${PORTS[@]}"; do
  i=$((i + 1)); h="host$i"
  if [[ "$spec" == *:* ]]; then addr="${spec%:*}"; port="${spec##*:}"; else addr="$ADDR"; port="$spec"; fi
  [ -f "$DIR/$h.key" ] || ssh-keygen -q -t ed25519 -N '' -f "$DIR/$h.key"
  cat > "$DIR/sshd_$h.conf" <<CFG
Port $port
ListenAddress $addr
HostKey $DIR/$h.key
PidFile $DIR/sshd-$h.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $DIR/authorized_keys
StrictModes no
UsePAM no
AcceptEnv *
SetEnv MN_SSH_HOST=$h
Subsystem sftp internal-sftp
LogLevel INFO
CFG
  cat >> "$DIR/ssh_config" <<CFG
Host $h
  HostName $addr
  Port $port
  User root
  IdentityFile $DIR/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile $DIR/known_hosts
  LogLevel ERROR
  BatchMode yes
CFG
  case "$addr" in 127.*) ;; *) echo "refusing non-loopback address $addr" >&2; exit 1;; esac
  "$SSHD" -t -f "$DIR/sshd_$h.conf"
  "$SSHD" -f "$DIR/sshd_$h.conf" -E "$DIR/sshd_$h.log" \
    || { echo "sshd $h did not start:" >&2; tail -n 20 "$DIR/sshd_$h.log" >&2; exit 1; }   # forks; PID in sshd-$h.pid
done
# wait until every port accepts a login
for j in $(seq "$i"); do
  ok=0
  for _ in $(seq 50); do
    if ssh -F "$DIR/ssh_config" -o ConnectTimeout=2 "host$j" true 2>/dev/null; then ok=1; break; fi
    sleep 0.1
  done
  if [ "$ok" != 1 ]; then
    echo "sshd host$j not reachable; $DIR/sshd_host$j.log says:" >&2
    tail -n 20 "$DIR/sshd_host$j.log" >&2
    ssh -F "$DIR/ssh_config" -o ConnectTimeout=2 -o LogLevel=VERBOSE "host$j" true 2>&1 | tail -n 10 >&2
    exit 1
  fi
done
echo "$DIR"
