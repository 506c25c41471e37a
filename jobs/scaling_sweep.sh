#!/bin/bash
#SBATCH --job-name=hpcdl-scaling
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
# Strong scaling on one machine: the same global batch on 1, 2, 4 ... ranks, with
# throughput and scaling efficiency relative to the smallest rank count. For a sweep
# over nodes use the scaling-sweep Slurm template (hpcdl slurm render scaling-sweep).
#
#   jobs/scaling_sweep.sh           run from the repository root
#   sbatch jobs/scaling_sweep.sh    submit from the repository root (one node)
#
# Environment: RANK_COUNTS (default "1 2 4", capped by SLURM_NTASKS in a job),
# GLOBAL_BATCH (default 128), TRAIN_ARGS, OUT_DIR (default runs/scaling),
# MPIEXEC (default: the venv's mpiexec).
set -euo pipefail
ROOT=${HPCDL_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$ROOT"
MPIEXEC=${MPIEXEC:-.venv/bin/mpiexec}
RANK_COUNTS=${RANK_COUNTS:-"1 2 4"}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
TRAIN_ARGS=${TRAIN_ARGS:-"--dataset mnist5k --model cnn --steps 60"}
OUT_DIR=${OUT_DIR:-runs/scaling}
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    export HYDRA_LAUNCHER=${HYDRA_LAUNCHER:-fork}
fi

counts=()
for ranks in $RANK_COUNTS; do
    if [[ -n ${SLURM_NTASKS:-} && $ranks -gt $SLURM_NTASKS ]]; then
        echo "skipping $ranks ranks: the job has $SLURM_NTASKS tasks"
        continue
    fi
    if (( GLOBAL_BATCH % ranks != 0 )); then
        echo "error: GLOBAL_BATCH=$GLOBAL_BATCH is not divisible by $ranks ranks" >&2
        exit 2
    fi
    echo "== $ranks ranks"
    # shellcheck disable=SC2086 # TRAIN_ARGS is a list of arguments
    "$MPIEXEC" -n "$ranks" .venv/bin/hpcdl train $TRAIN_ARGS --batch-size $((GLOBAL_BATCH / ranks)) \
        --progress log --run-dir "$OUT_DIR/ranks$ranks"
    counts+=("$ranks")
done

.venv/bin/python - "$OUT_DIR" "${counts[@]}" <<'PY'
import json
import sys
from pathlib import Path

out_dir, counts = Path(sys.argv[1]), [int(n) for n in sys.argv[2:]]
rates = {n: json.loads((out_dir / f"ranks{n}" / "summary.json").read_text())["samples_per_s"] for n in counts}
base = counts[0]
print(f"{'ranks':>5} {'samples/s':>10} {'speedup':>8} {'efficiency':>10}")
for n in counts:
    speedup = rates[n] / rates[base]
    print(f"{n:>5} {rates[n]:>10.1f} {speedup:>8.2f} {speedup / (n / base):>10.2f}")
PY
