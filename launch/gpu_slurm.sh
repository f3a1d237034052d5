#!/bin/bash
# Train on one or more 8-GPU nodes under SLURM: one process per GPU (JAX's SLURM convention: each task drives the
# GPU of its SLURM_LOCALID), all started by srun; jax.distributed is initialised from the SLURM environment.
#
# Once, on the shared file system, from the repository root:
#   python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda12]"
# Then, from the repository root:
#   WORKDIR=/shared/runs/imagenet256 DATA_DIR=/shared/tensorflow_datasets sbatch launch/gpu_slurm.sh
#   WORKDIR=... DATA_DIR=... sbatch --nodes=4 launch/gpu_slurm.sh --config.batch_size=1024   # 32 GPUs
#
# Environment: WORKDIR (required), DATA_DIR (the TFDS data directory holding imagenet2012 as array_record; default
# $HOME/tensorflow_datasets), CONFIG (default configs/imagenet256.py:gpu), VENV (default .venv).
# Five minutes before the time limit SLURM signals this script (--signal=B:USR1@300); it sends SIGTERM to the
# training processes (scancel --signal), which checkpoint at the step they reached and exit with code 75 ("stopped,
# resume me"), and then requeues the job, which resumes from WORKDIR. srun reports 75, or 128 + a signal for the
# tasks that --kill-on-bad-exit stops once the first one has exited (or that the time limit kills mid-save): those
# are requeued too (the run resumes from its newest complete checkpoint). A run that finished (0) or failed (1, or 2:
# an error line) is not requeued; the script exits with the training's exit code.
#
#SBATCH --job-name=selfperc
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

: "${WORKDIR:?set WORKDIR (a directory every node can write)}"
CONFIG="${CONFIG:-configs/imagenet256.py:gpu}"
DATA_DIR="${DATA_DIR:-$HOME/tensorflow_datasets}"
VENV="${VENV:-.venv}"
cd "${SLURM_SUBMIT_DIR:-.}"  # sbatch runs a copy of this script; the submit directory is the repository root
[[ -d selfperc_jax ]] || { echo "submit from the repository root (no selfperc_jax/ in $PWD)" >&2; exit 2; }

echo "$(date) job ${SLURM_JOB_ID:-?}: ${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-8} processes"
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-12}" "$VENV/bin/python" -m selfperc_jax.main \
  --config="$CONFIG" --workdir="$WORKDIR" --config.data.dir="$DATA_DIR" "$@" &
SRUN_PID=$!

on_time_limit() {
  echo "$(date) time limit near: checkpointing"
  scancel --signal=TERM "$SLURM_JOB_ID.0"  # every task of the training step (step 0) gets SIGTERM
  local rc=0
  wait "$SRUN_PID" || rc=$?
  if [[ $rc == 0 || $rc == 1 || $rc == 2 ]]; then
    echo "$(date) training exited with code $rc (0: finished; 1, 2: failed): not requeued"
  else
    echo "$(date) stopped (exit code $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$rc"
}
trap on_time_limit USR1
rc=0
wait "$SRUN_PID" || rc=$?
exit "$rc"
