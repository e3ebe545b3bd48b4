#!/usr/bin/env bash
# Run N sft_jax processes on this machine (127.0.0.1), each with its own fake CPU devices:
# the multi-host code path (jax.distributed, per-process data shards, Orbax multi-process
# checkpoints) without a cluster. Used by the tests.
#
#   launch/local_multiprocess.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] -- \
#       python -m sft_jax.train --config=configs/tiny.py --workdir=runs/mp
#
# Each process gets SFT_JAX_COORDINATOR / SFT_JAX_NUM_PROCESSES / SFT_JAX_PROCESS_ID, which
# sft_jax.distributed.initialize() reads. Logs go to $LOG_DIR/process_<i>.log (process 0 is
# also streamed). Exit status: the first non-zero status of any process, else 0. When one
# process fails, the others are stopped after a grace period so nothing hangs.
set -euo pipefail
n=2; d=4; port=""; grace=${SFT_JAX_GRACE_S:-60}
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n=$2; shift 2;;
    -d) d=$2; shift 2;;
    -p) port=$2; shift 2;;
    --) shift; break;;
    *) echo "local_multiprocess.sh: unknown option $1 (use -n N -d D -p PORT -- command...)" >&2; exit 2;;
  esac
done
[[ $# -gt 0 ]] || { echo "local_multiprocess.sh: no command given after --" >&2; exit 2; }
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fi
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < n; i++)); do
  SFT_JAX_COORDINATOR="127.0.0.1:$port" SFT_JAX_NUM_PROCESSES=$n SFT_JAX_PROCESS_ID=$i \
  XLA_FLAGS="--xla_force_host_platform_device_count=$d ${XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
    "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
# SIGTERM/SIGINT to this script go to every process: they agree to stop at the same step, save
# a checkpoint and exit 0 (the trainer's PreemptionFlag); resume with the same command.
forward() { echo "local_multiprocess.sh: forwarding SIG$1 to ${pids[*]}" >&2; kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward TERM' INT
tail -n +1 -f "$LOG_DIR/process_0.log" --pid="${pids[0]}" &
tailpid=$!
status=0
remaining=$n
declare -A done_
while (( remaining > 0 )); do
  for i in "${!pids[@]}"; do
    [[ -n "${done_[$i]:-}" ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      wait "${pids[$i]}" && rc=0 || rc=$?
      done_[$i]=1; remaining=$((remaining - 1))
      if (( rc != 0 )); then
        echo "local_multiprocess.sh: process $i exited with $rc (log: $LOG_DIR/process_$i.log)" >&2
        (( status == 0 )) && status=$rc
        # give the others a grace period to notice and exit on their own, then stop them
        ( sleep "$grace"; for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done ) &
      fi
    fi
  done
  sleep 0.5
done
kill "$tailpid" 2>/dev/null || true
exit $status
