#!/usr/bin/env bash
# Train one recipe across SLURM nodes; a preempted or timed-out job saves, requeues itself and resumes.
#
#   sbatch slurm/train.sh [RECIPE] [ann train options...]
#   sbatch slurm/train.sh                                     # cityscapes (built-in), the paper's run
#   sbatch slurm/train.sh recipes/ade20k.yaml --set train.iters=1000
#   sbatch --nodes=1 --gpus-per-node=8 slurm/train.sh         # the same 8 GPUs on one node
#   sbatch -J exp1 slurm/train.sh                             # another run directory: runs/exp1-cityscapes
#   sbatch --gpus-per-node=0 --cpus-per-task=1 slurm/train.sh recipes/demo.yaml   # CPU-only cluster
#
# Defaults: 2 nodes x 4 GPUs = the paper's world of 8 processes (ann_r101-d8_8xb1-...: 8 x batch 1).
# `ann train` plans and starts everything: inside the allocation it runs srun with one task per node, each
# task a torchrun agent; the agents meet in a c10d rendezvous at the first node of the job (address from
# `scontrol show node`, port from the job id). `ann train ... --dry-run` prints that srun line.
# The run directory is runs/<job name>-<recipe file name> (WORK_DIR=... overrides it): the same after a
# requeue, so `--resume auto` continues from its newest complete checkpoint.
# The `ann` command is $ANN (default: `ann` on PATH; jobs inherit the submitting shell's PATH).
#
#SBATCH --job-name=ann
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# --signal has no B: prefix on purpose: every process of the step gets SIGTERM 120 s before the time
# limit; the ranks agree on it at the end of a step, save a checkpoint and exit with EXIT_PREEMPTED.

# Network knobs, when NCCL or Gloo pick an interface the other nodes cannot reach (README: "When a node cannot reach the head node"):
# export NCCL_SOCKET_IFNAME=ib0          # a prefix list (eth,ib) or an exclusion (^lo,docker0)
# export GLOO_SOCKET_IFNAME=eth0         # Gloo (CPU collectives, DeepSpeed on CPU) needs its own
# export NCCL_DEBUG=INFO                 # which interfaces and transports NCCL chose, per rank
# export ANN_RDZV_TIMEOUT=900            # seconds every node has to join the rendezvous

set -uo pipefail

EXIT_USAGE=2
EXIT_PREEMPTED=124   # anncli.errors.EXIT_PREEMPTED: the run saved on SIGTERM/SIGUSR1 and wants a requeue

usage() {
    cat <<'EOF'
usage: sbatch [sbatch options] slurm/train.sh [RECIPE] [ann train options...]

  RECIPE     recipe YAML, or a built-in name (ann recipes list; default: cityscapes)
  options    passed to `ann train`, e.g. --set train.iters=1000 --set engine=deepspeed

Run directory: runs/<job name>-<recipe file name>, or $WORK_DIR. The job requeues itself when
training exits with 124 (preempted after saving) and resumes from the newest complete checkpoint.
Override the #SBATCH defaults on the command line: --nodes, --gpus-per-node, --cpus-per-task, --time.
EOF
}

die() {
    echo "slurm/train.sh: error: $1" >&2
    usage >&2
    exit "$EXIT_USAGE"
}

recipe="cityscapes"
[[ $# -gt 0 && "$1" != -* ]] && { recipe="$1"; shift; }
for arg in "$@"; do [[ "$arg" == -h || "$arg" == --help ]] && { usage; exit 0; }; done
# a bare name that is no file is a built-in recipe, which `ann` checks below
[[ -f "$recipe" || "$recipe" != */* ]] || die "recipe '$recipe' not found (relative paths start at $PWD)"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job: submit it with sbatch"
ann="${ANN:-ann}"
command -v "$ann" >/dev/null || die "'$ann' not found: activate the environment with ann before sbatch, or set ANN"

name="$(basename "$recipe")"
work_dir="${WORK_DIR:-runs/${SLURM_JOB_NAME:-ann}-${name%.*}}"
args=(train "$recipe" --work-dir "$work_dir" --resume auto "$@")
echo "ann: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: recipe $recipe, run directory $work_dir"

# Check the recipe and options once and print the plan (world, batch, LR, the exact srun line), then run it:
# inside the allocation `ann train` starts that srun itself, one torchrun agent per node.
"$ann" "${args[@]}" --dry-run | sed -n '/^---$/,$p' || exit "$EXIT_USAGE"
"$ann" "${args[@]}"
rc=$?

if [[ "$rc" -eq "$EXIT_PREEMPTED" ]]; then
    echo "ann: job $SLURM_JOB_ID saved a checkpoint after a preemption signal; requeueing it"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        # Exiting 0 here would end an unfinished run as COMPLETED.
        echo "slurm/train.sh: error: 'scontrol requeue $SLURM_JOB_ID' failed; the run is unfinished (its checkpoint" \
             "is saved): submit the same sbatch line again and --resume auto continues it" >&2
        exit "$EXIT_PREEMPTED"
    fi
    exit 0
fi
echo "ann: job $SLURM_JOB_ID finished with exit code $rc"
exit "$rc"
