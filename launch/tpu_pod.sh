#!/usr/bin/env bash
# Train on a TPU VM pod slice: create the TPU VM, copy this checkout to every worker,
# install it, run the same command on --worker=all (jax.distributed auto-detects the pod),
# stream logs, and delete the VM at the end (unless KEEP=1).
#
#   NAME=sft-v5e TYPE=v5litepod-16 ZONE=us-west4-a PROJECT=my-proj VERSION=v2-alpha-tpuv5-lite \
#     launch/tpu_pod.sh --config=configs/llama3_8b_lora.py --config.model.path=/gcs/llama3 --workdir=gs://bucket/run1
#
# Needs gcloud authenticated for PROJECT. Workdir and model should be on storage every worker
# sees (a GCS bucket via gcsfuse, or Filestore): Orbax writes one checkpoint from all workers.
set -euo pipefail
: "${NAME:?set NAME (TPU VM name)}" "${TYPE:?set TYPE (e.g. v5litepod-16, v5p-16, v4-32)}"
: "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
VERSION=${VERSION:-tpu-ubuntu2204-base}
KEEP=${KEEP:-0}
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: give the sft_jax.train arguments (e.g. --config=configs/lima.py)" >&2; exit 2; }
g() { gcloud --project="$PROJECT" compute tpus tpu-vm "$@" --zone="$ZONE"; }
cleanup() { if [[ "$KEEP" != 1 ]]; then echo "deleting $NAME"; g delete "$NAME" --quiet || true; fi; }
if ! g describe "$NAME" >/dev/null 2>&1; then
  g create "$NAME" --accelerator-type="$TYPE" --version="$VERSION"
fi
trap cleanup EXIT
root=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp --suffix=.tar.gz)
git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
g scp "$tarball" "$NAME":~/sft_jax.tar.gz --worker=all
g ssh "$NAME" --worker=all --command="mkdir -p ~/sft_jax && tar -xzf ~/sft_jax.tar.gz -C ~/sft_jax && \
  cd ~/sft_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]==0.10.2'"
args=$(printf '%q ' "$@")
# SFT_JAX_DISTRIBUTED=auto: jax.distributed finds the pod's workers from the TPU metadata server
# (TPU VMs do not export the worker list to an ssh session).
g ssh "$NAME" --worker=all --command="cd ~/sft_jax && . .venv/bin/activate && \
  SFT_JAX_DISTRIBUTED=auto python -m sft_jax.train $args" 2>&1 \
  | tee "tpu_pod_${NAME}.log"
