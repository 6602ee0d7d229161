#!/usr/bin/env bash
# A private single-node Slurm cluster (munged, slurmctld, slurmd) under one folder, for CI and
# for trying `--slurm N --submit` on one machine. Needs root and Debian's slurm-wlm and munge;
# no cgroups, no systemd (see slurm.conf.in).
#
#   bash .ci/slurm/cluster.sh start DIR   # prints the SLURM_CONF to export; idle node within 30 s
#   bash .ci/slurm/cluster.sh stop DIR    # cancels its jobs and stops its three daemons
#
# Ports are picked free at start, so several clusters (several CI runs) can share a machine.
set -euo pipefail
cmd="${1:-}"; dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"

stop_pid() { # pidfile: TERM, then KILL after 10 s
  [ -f "$1" ] || return 0
  local pid; pid="$(cat "$1")"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

case "$cmd" in
start)
  for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || { echo "$b not found: apt-get install slurm-wlm munge" >&2; exit 1; }
  done
  [ "$(id -u)" -eq 0 ] || { echo "the private cluster runs its daemons as root: run as root" >&2; exit 1; }
  mkdir -p "$dir"; dir="$(cd "$dir" && pwd)"
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
  chmod 755 "$dir" "$dir/munge"
  # Two free TCP ports (in use: a connection succeeds).
  free_port() {
    local p
    for _ in $(seq 200); do
      p=$(( 20000 + RANDOM % 20000 ))
      (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
    echo "no free port found" >&2; exit 1
  }
  ctld_port="$(free_port)"; slurmd_port="$(free_port)"
  [ "$ctld_port" != "$slurmd_port" ] || slurmd_port=$(( ctld_port + 1 ))
  host="$(hostname -s)"
  sed -e "s|@HOST@|$host|g" -e "s|@DIR@|$dir|g" -e "s|@CTLD_PORT@|$ctld_port|" \
      -e "s|@SLURMD_PORT@|$slurmd_port|" -e "s|@CPUS@|$(nproc)|" -e "s|@MEM_MB@|1024|" \
      "$here/slurm.conf.in" > "$dir/slurm.conf"
  head -c 1024 /dev/urandom > "$dir/munge/munge.key"; chmod 600 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 300); do
    state="$(sinfo -h -o %t 2>/dev/null || true)"
    if [ "$state" = "idle" ]; then echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
    sleep 0.1
  done
  echo "the node is not idle after 30 s (state: ${state:-no answer}); logs in $dir:" >&2
  tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  exit 1
  ;;
stop)
  [ -d "$dir" ] || exit 0
  if [ -f "$dir/slurm.conf" ] && [ -f "$dir/slurmctld.pid" ]; then
    SLURM_CONF="$dir/slurm.conf" scancel --user="$(id -un)" 2>/dev/null || true
  fi
  stop_pid "$dir/slurmd.pid"
  stop_pid "$dir/slurmctld.pid"
  stop_pid "$dir/munge/munged.pid"
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
