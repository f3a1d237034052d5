#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it (or reuse it), copy this checkout to every worker, install, and
# start the same command on all workers. Every worker runs `python -m selfperc_jax.main`; JAX finds the other
# workers by itself (jax.distributed is initialised from the TPU environment).
#
#   TPU_NAME=sp-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=gs://my-bucket/runs/imagenet256 DATA_BUCKET=my-bucket DATA_PATH=tensorflow_datasets \
#   launch/tpu_vm.sh [extra flags for selfperc_jax.main, e.g. --config.batch_size=512]
#
# Environment:
#   TPU_NAME, ZONE            required
#   WORKDIR                   required; a gs:// path, so that checkpoints outlive the VM
#   ACCELERATOR_TYPE          default v4-32 (any v4/v5e/v5p type; the config shards over all its chips)
#   RUNTIME_VERSION           default tpu-ubuntu2204-base
#   CONFIG                    default configs/imagenet256.py (the pod-slice default)
#   DATA_BUCKET, DATA_PATH    the bucket and the folder in it that hold the prepared TFDS imagenet2012
#                             (array_record; see README "ImageNet"); mounted with gcsfuse at /tmp/tfds on every worker.
#                             Without DATA_BUCKET, DATA_DIR (default $HOME/tensorflow_datasets) must exist on every worker.
#   SPOT=1                    create a Spot VM; when it is preempted the run checkpoints, and running this script
#                             again (it reuses or recreates the VM) resumes from WORKDIR.
#   DRY_RUN=1                 print the gcloud commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (a gs:// path)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/imagenet256.py}"
DATA_DIR="${DATA_DIR:-\$HOME/tensorflow_datasets}"  # expanded on the workers
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
on_all() { run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

# 1. The VM: reuse it if it exists, else create it.
if [[ "${DRY_RUN:-0}" != 1 ]] && gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  echo "reusing TPU VM $TPU_NAME"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${SPOT:+--spot}
fi

# 2. This checkout (committed files) on every worker, installed with JAX for TPU.
ARCHIVE="$(mktemp -d)/selfperc_jax.tar.gz"
run git -C "$REPO_ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":~/selfperc_jax.tar.gz --zone="$ZONE" --worker=all
on_all "rm -rf ~/selfperc_jax && mkdir ~/selfperc_jax && tar -xzf ~/selfperc_jax.tar.gz -C ~/selfperc_jax \
  && python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && ~/venv/bin/pip install -q -e ~/selfperc_jax 'jax[tpu]'"

# 3. The data: the bucket mounted read-only with gcsfuse (random access to array_record needs a file system path).
if [[ -n "${DATA_BUCKET:-}" ]]; then
  DATA_DIR="/tmp/tfds"
  on_all "(command -v gcsfuse >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q gcsfuse)) \
    && mkdir -p $DATA_DIR && (mountpoint -q $DATA_DIR || gcsfuse -o ro --implicit-dirs \
    ${DATA_PATH:+--only-dir $DATA_PATH} $DATA_BUCKET $DATA_DIR)"
fi

# 4. The same command on every worker, in the background; its log is ~/train.log on each worker.
EXTRA=""
for arg in "$@"; do EXTRA+=" $(printf '%q' "$arg")"; done
on_all "cd ~/selfperc_jax && nohup ~/venv/bin/python -m selfperc_jax.main --config=$CONFIG --workdir=$WORKDIR \
  --config.data.dir=$DATA_DIR$EXTRA > ~/train.log 2>&1 &"
echo "started on all workers of $TPU_NAME; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/train.log'"
