#!/bin/bash
# Train on one or more 8-GPU nodes under SLURM: one process per GPU (JAX's SLURM convention: each task drives the
# GPU of its SLURM_LOCALID), all started by srun; jax.distributed is initialised from the SLURM environment.
#
# Once, on the shared file system, from the repository root:
#   python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda12]"
# Then:
#   WORKDIR=/shared/runs/imagenet256 DATA_DIR=/shared/tensorflow_datasets sbatch launch/gpu_slurm.sh
#   WORKDIR=... DATA_DIR=... sbatch --nodes=4 launch/gpu_slurm.sh --config.batch_size=1024   # 32 GPUs
#
# Environment: WORKDIR (required), DATA_DIR (the TFDS data directory holding imagenet2012 as array_record; default
# $HOME/tensorflow_datasets), CONFIG (default configs/imagenet256.py:gpu), VENV (default .venv).
# SLURM sends SIGTERM 5 minutes before the time limit (--signal): the run checkpoints at the step it reached and
# exits; --requeue restarts the job, which resumes from WORKDIR.
#
#SBATCH --job-name=selfperc
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

: "${WORKDIR:?set WORKDIR (a directory every node can write)}"
CONFIG="${CONFIG:-configs/imagenet256.py:gpu}"
DATA_DIR="${DATA_DIR:-$HOME/tensorflow_datasets}"
VENV="${VENV:-.venv}"
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

echo "$(date) job ${SLURM_JOB_ID:-?}: ${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-8} processes"
srun --kill-on-bad-exit=1 "$VENV/bin/python" -m selfperc_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.dir="$DATA_DIR" "$@"
