#!/bin/bash
#SBATCH --job-name=hpcdl-compare
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
# Train the same model with several strategies on the same ranks and print a table
# of accuracy, throughput and bytes sent.
#
#   jobs/compare_strategies.sh          run from the repository root
#   sbatch jobs/compare_strategies.sh   submit from the repository root (one node)
#
# Environment: RANKS (default 4), STRATEGIES (space-separated specs), TRAIN_ARGS,
# OUT_DIR (default runs/compare), MPIEXEC (default: the venv's mpiexec).
set -euo pipefail
ROOT=${HPCDL_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$ROOT"
MPIEXEC=${MPIEXEC:-.venv/bin/mpiexec}
RANKS=${SLURM_NTASKS:-${RANKS:-4}}
STRATEGIES=${STRATEGIES:-"allreduce local-sgd:period=4 diloco:period=8 hierarchical:period=4"}
TRAIN_ARGS=${TRAIN_ARGS:-"--dataset digits --model mlp --epochs 5"}
OUT_DIR=${OUT_DIR:-runs/compare}
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    export HYDRA_LAUNCHER=${HYDRA_LAUNCHER:-fork}
fi

for strategy in $STRATEGIES; do
    # A run directory per strategy, with ':' ',' '=' replaced so it is a plain name.
    name=$(echo "$strategy" | tr ':,=' '_-_')
    echo "== $strategy"
    # shellcheck disable=SC2086 # TRAIN_ARGS is a list of arguments
    "$MPIEXEC" -n "$RANKS" .venv/bin/hpcdl train $TRAIN_ARGS --strategy "$strategy" --progress log \
        --run-dir "$OUT_DIR/$name"
done

.venv/bin/python - "$OUT_DIR" $STRATEGIES <<'PY'
import json
import sys
from pathlib import Path

out_dir, strategies = Path(sys.argv[1]), sys.argv[2:]
print(f"{'strategy':<32} {'test acc':>8} {'samples/s':>10} {'MB sent':>10}")
for strategy in strategies:
    name = strategy.translate(str.maketrans(":,=", "_-_"))
    summary = json.loads((out_dir / name / "summary.json").read_text())
    print(f"{strategy:<32} {summary.get('test_accuracy', float('nan')):>8.3f} "
          f"{summary['samples_per_s']:>10.1f} {summary['comm_bytes'] / 1e6:>10.2f}")
PY
