#!/usr/bin/env bash
# Multi-scale + flip evaluation of one checkpoint across SLURM nodes; the metrics JSON goes into the run.
#
#   sbatch slurm/eval.sh [RECIPE] [CHECKPOINT] [ann eval options...]
#   sbatch slurm/eval.sh                                      # cityscapes (built-in), newest checkpoint
#   sbatch slurm/eval.sh recipes/cityscapes.yaml runs/ann-cityscapes/checkpoints/step-060000
#   sbatch slurm/eval.sh recipes/cityscapes.yaml --scales 0.75,1,1.25 --mode slide
#
# The run directory is the one slurm/train.sh used for the same job name and recipe:
# runs/<job name>-<recipe file name> (WORK_DIR=... overrides it). Without CHECKPOINT, the newest
# complete checkpoint of that run is evaluated (`ann eval --work-dir` finds it). Metrics:
# <run>/eval-<checkpoint>-ms-flip.json.
#
#SBATCH --job-name=ann
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# Network knobs (README: "When a node cannot reach the head node"):
# export NCCL_SOCKET_IFNAME=ib0
# export GLOO_SOCKET_IFNAME=eth0
# export NCCL_DEBUG=INFO

set -uo pipefail

EXIT_USAGE=2

usage() {
    cat <<'EOF'
usage: sbatch [sbatch options] slurm/eval.sh [RECIPE] [CHECKPOINT] [ann eval options...]

  RECIPE       recipe YAML, or a built-in name (ann recipes list; default: cityscapes)
  CHECKPOINT   checkpoint directory (default: the newest complete one of the run)
  options      passed to `ann eval`, e.g. --scales 0.75,1,1.25 --mode slide

Evaluates with the recipe's eval.scales (--multiscale) and horizontal flip (--flip) on every node;
writes <run directory>/eval-<checkpoint>-ms-flip.json. Run directory: runs/<job name>-<recipe
file name>, or $WORK_DIR.
EOF
}

die() {
    echo "slurm/eval.sh: error: $1" >&2
    usage >&2
    exit "$EXIT_USAGE"
}

recipe="cityscapes"
checkpoint=""
[[ $# -gt 0 && "$1" != -* ]] && { recipe="$1"; shift; }
[[ $# -gt 0 && "$1" != -* ]] && { checkpoint="$1"; shift; }
for arg in "$@"; do [[ "$arg" == -h || "$arg" == --help ]] && { usage; exit 0; }; done
# a bare name that is no file is a built-in recipe, which `ann` checks below
[[ -f "$recipe" || "$recipe" != */* ]] || die "recipe '$recipe' not found (relative paths start at $PWD)"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job: submit it with sbatch"
ann="${ANN:-ann}"
command -v "$ann" >/dev/null || die "'$ann' not found: activate the environment with ann before sbatch, or set ANN"

name="$(basename "$recipe")"
work_dir="${WORK_DIR:-runs/${SLURM_JOB_NAME:-ann}-${name%.*}}"
checkpoint_opt=()
[[ -z "$checkpoint" ]] || checkpoint_opt=(--checkpoint "$checkpoint")
echo "ann: job $SLURM_JOB_ID: evaluating ${checkpoint:-the newest complete checkpoint of $work_dir}"

# `ann eval` finds the checkpoint (or checks the given one), names the metrics file after it ({checkpoint}),
# and inside the allocation starts srun itself, one torchrun agent per node.
"$ann" eval "$recipe" "${checkpoint_opt[@]}" --work-dir "$work_dir" --multiscale --flip \
    --json "$work_dir/eval-{checkpoint}-ms-flip.json" "$@"
rc=$?
echo "ann: job $SLURM_JOB_ID finished with exit code $rc"
exit "$rc"
