#!/bin/bash
#SBATCH --job-name=hpcdl-demo
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --time=00:15:00
#SBATCH --output=%x-%j.out
# The demo: hpcdl train with jobs/demo.toml (an MLP on the built-in digits data set)
# on 2 ranks.
#
#   jobs/demo.sh                 run from the repository root; RANKS=4 for 4 ranks
#   sbatch jobs/demo.sh          submit from the repository root (one node)
#
# Environment: RANKS, EPOCHS, RUN_DIR, MPIEXEC (default: the venv's mpiexec).
set -euo pipefail
# sbatch runs a copy of this script, so the repository is where it was submitted from.
ROOT=${HPCDL_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$ROOT"
MPIEXEC=${MPIEXEC:-.venv/bin/mpiexec}
RANKS=${SLURM_NTASKS:-${RANKS:-2}}
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    # One node: Hydra starts the ranks itself instead of through srun.
    export HYDRA_LAUNCHER=${HYDRA_LAUNCHER:-fork}
fi

"$MPIEXEC" -n "$RANKS" .venv/bin/hpcdl train jobs/demo.toml ${EPOCHS:+--epochs "$EPOCHS"} \
    --run-dir "${RUN_DIR:-runs/demo}"
