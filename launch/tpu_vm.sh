#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it (or reuse it), copy this checkout to every worker, install, and
# start the same command on all workers. Every worker runs `python -m selfperc_jax.main --distributed=on`: JAX finds
# the other workers from the TPU VM's metadata.
#
#   TPU_NAME=sp-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=gs://my-bucket/runs/imagenet256 DATA_BUCKET=my-bucket DATA_PATH=tensorflow_datasets \
#   launch/tpu_vm.sh [extra flags for selfperc_jax.main, e.g. --config.batch_size=512]
#
# Environment:
#   TPU_NAME, ZONE            required
#   WORKDIR                   required; a gs:// path, so that checkpoints outlive the VM
#   ACCELERATOR_TYPE          default v4-32 (v4, v5litepod, v5p and v6e types; the config shards over all chips)
#   RUNTIME_VERSION           default: the TPU software version for the type (tpu-ubuntu2204-base for v4,
#                             v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
#   CONFIG                    default configs/imagenet256.py (the pod-slice default)
#   DATA_BUCKET, DATA_PATH    the bucket and the folder in it that hold the prepared TFDS imagenet2012
#                             (array_record; see README "ImageNet"); mounted with gcsfuse at /tmp/tfds on every worker.
#                             Without DATA_BUCKET, DATA_DIR (default $HOME/tensorflow_datasets) must exist on every worker.
#   SPOT=1                    create a Spot VM; when it is preempted the run checkpoints, and running this script
#                             again (it recreates a preempted VM) resumes from WORKDIR.
#   DRY_RUN=1                 print the gcloud commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (a gs:// path)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
case "$ACCELERATOR_TYPE" in
  v5litepod-*|v5e-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$DEFAULT_RUNTIME}"
CONFIG="${CONFIG:-configs/imagenet256.py}"
DATA_DIR="${DATA_DIR:-\$HOME/tensorflow_datasets}"  # expanded on the workers
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
on_all() { run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

# 1. The VM: reuse it if it is up, recreate it if it was preempted, else create it.
STATE=""
if [[ "${DRY_RUN:-0}" != 1 ]]; then
  STATE="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(state)' 2>/dev/null || true)"
fi
if [[ "$STATE" == PREEMPTED || "$STATE" == TERMINATED ]]; then
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
  STATE=""
fi
if [[ -n "$STATE" ]]; then
  echo "reusing TPU VM $TPU_NAME ($STATE)"
else
  SPOT_FLAG=()
  [[ "${SPOT:-0}" == 1 ]] && SPOT_FLAG=(--spot)
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${SPOT_FLAG[@]}"
fi

# 2. This checkout (committed files) on every worker, installed with JAX for TPU into a Python 3.11 environment
#    made by uv (the TPU images ship an older Python than JAX needs).
ARCHIVE="$(mktemp -d)/selfperc_jax.tar.gz"
run git -C "$REPO_ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":~/selfperc_jax.tar.gz --zone="$ZONE" --worker=all
on_all "rm -rf ~/selfperc_jax && mkdir ~/selfperc_jax && tar -xzf ~/selfperc_jax.tar.gz -C ~/selfperc_jax \
  && python3 -m pip install -q --user -U uv && ~/.local/bin/uv venv -q --python 3.11 --allow-existing ~/venv \
  && ~/.local/bin/uv pip install -q --python ~/venv/bin/python -e ~/selfperc_jax 'jax[tpu]'"

# 3. The data: the bucket mounted read-only with gcsfuse (random access to array_record needs a file system path).
if [[ -n "${DATA_BUCKET:-}" ]]; then
  DATA_DIR="/tmp/tfds"
  on_all "(command -v gcsfuse >/dev/null || ( \
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \
gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null \
      && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc \
      >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse)) \
    && mkdir -p $DATA_DIR && (mountpoint -q $DATA_DIR || gcsfuse -o ro --implicit-dirs \
    ${DATA_PATH:+--only-dir $DATA_PATH} $DATA_BUCKET $DATA_DIR)"
fi

# 4. The same command on every worker, in the background; its log is ~/train.log on each worker.
EXTRA=""
for arg in "$@"; do EXTRA+=" $(printf '%q' "$arg")"; done
on_all "cd ~/selfperc_jax && nohup ~/venv/bin/python -m selfperc_jax.main --distributed=on --config=$CONFIG \
  --workdir=$WORKDIR --config.data.dir=$DATA_DIR$EXTRA < /dev/null > ~/train.log 2>&1 &"
echo "started on all workers of $TPU_NAME; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/train.log'"
