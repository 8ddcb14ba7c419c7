#!/usr/bin/env bash
# Stop what up.sh started, by PID file (never pkill by name). Safe to run twice or with nothing running.
set -u
if command -v scancel >/dev/null && [ -s /run/slurm/slurmctld.pid ]; then
    scancel --full --signal=KILL --user=root 2>/dev/null || true
    for _ in $(seq 40); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.25; done
fi
stop_pid() {
    [ -s "$1" ] || return 0
    local pid
    pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
}
stop_pid /run/slurm/slurmd.pid
stop_pid /run/slurm/slurmctld.pid
stop_pid /run/munge/munged.pid
rm -f /run/slurm/slurmd.pid /run/slurm/slurmctld.pid
