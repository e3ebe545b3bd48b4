#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per node, all GPUs of the node visible to it;
# jax.distributed finds the coordinator (the first node) and the process ids from SLURM's
# environment (JAX's SLURM cluster detection), so the command is the same on every node.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh --config=configs/llama3_8b_lora.py --workdir=/shared/runs/x
#
# Set VENV to the virtualenv holding sft_jax (same path on every node), e.g. VENV=$HOME/sft_jax/.venv.
#SBATCH --job-name=sft_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=sft_jax-%j.out
# SIGTERM every task 2 minutes before the time limit: the trainer agrees on a step, saves a
# checkpoint and exits; resubmit the same command to resume.
#SBATCH --signal=TERM@120
set -euo pipefail
VENV=${VENV:-$PWD/.venv}
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "gpu_slurm.sh: submit with sbatch (e.g. sbatch --nodes=2 launch/gpu_slurm.sh --config=...)" >&2
  exit 2
fi
# The coordinator is the first node of the allocation; JAX derives it the same way, this only logs it.
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "sft_jax: $SLURM_NNODES nodes, coordinator $first"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
args=$(printf '%q ' "$@")  # keep each argument intact (spaces, quotes) through bash -c
srun --ntasks-per-node=1 bash -c "source '$VENV/bin/activate' && exec python -m sft_jax.train $args"
