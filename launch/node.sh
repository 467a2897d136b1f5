#!/usr/bin/env bash
# One per node, started by launch/slurm.sbatch through `srun --ntasks-per-node=1`: runs torchrun with
# NPROC_PER_NODE training processes on this node, and makes a SLURM stop signal reach them.
#
#   srun --ntasks-per-node=1 launch/node.sh --config CONFIG [key=value ...]
#
# The nodes meet through torchrun's c10d rendezvous on the job's first host, at a port derived from the job
# id (the same after a requeue, and different for two jobs sharing a node).
#
# Signals. SLURM signals every process of a job step (`scancel --signal=USR1 JOB`, `srun --signal`, and the
# SIGTERM before a job is killed), so torchrun gets them as well as this script and the workers:
#   - torchrun has no handler for SIGUSR1: it would die of it, failing the step (its workers would still
#     stop with a checkpoint, as workers do whose launcher died). So torchrun starts with SIGUSR1 ignored
#     (an ignored signal stays ignored across exec; the trainer installs its own handler, which replaces
#     the inherited "ignore"). This script catches USR1 itself and forwards it to
#     torchrun's workers (its direct children), which stop at an agreed step with a checkpoint and exit 0.
#   - torchrun turns SIGTERM into terminating its workers (SIGTERM, then SIGKILL after its shutdown
#     timeout). The trainer treats SIGTERM as a stop request too, so they still checkpoint; on TERM this
#     script also forwards USR1 so the workers start stopping at once. (Ignoring SIGTERM for torchrun does
#     not help: its agent installs a handler of its own. So after the trainer's `scontrol requeue`, the
#     SIGTERM that ends the running job makes torchrun exit 1 with a SignalException traceback in the
#     log, after the checkpoint: harmless, the job is already requeued.)
# bash runs a trap only between commands, so torchrun runs in the background and `wait` (which a trapped
# signal interrupts) is repeated until torchrun has really exited. Exit status: torchrun's.
set -uo pipefail

: "${SLURM_JOB_ID:?launch/node.sh runs inside a SLURM job (srun)}"
NNODES=${SLURM_NNODES:-1}
NODE_RANK=${SLURM_NODEID:-0}
# Processes on this node: NPROC_PER_NODE (CPU nodes, tests), else one per GPU of the node, else 1.
NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}}
[ "$NPROC" -gt 0 ] 2>/dev/null || NPROC=1
MASTER=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$SLURM_NODELIST}" | head -1)
PORT=$((29500 + SLURM_JOB_ID % 10000))
TAG="[node $NODE_RANK $(hostname -s)]"

echo "$TAG torchrun: $NNODES node(s) x $NPROC process(es), rendezvous $MASTER:$PORT, job $SLURM_JOB_ID" \
    "(restart ${SLURM_RESTART_COUNT:-0})"

trap '' USR1  # inherited by torchrun (see above)
torchrun \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER:$PORT" --rdzv_id="$SLURM_JOB_ID" \
    -m seg_dist.train "$@" &
TORCHRUN=$!

forward() {
    echo "$TAG got SIG$1: SIGUSR1 to the training processes (children of torchrun $TORCHRUN)"
    pkill -USR1 -P "$TORCHRUN" || echo "$TAG no training process to signal"
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait PID` returns >128 when a trapped signal interrupts it; only a `kill -0` failure means torchrun is gone.
# A wait interrupted just as torchrun ended leaves its status with bash: one more wait fetches it (or says 127
# when the previous wait already returned it).
while :; do
    wait "$TORCHRUN"
    status=$?
    kill -0 "$TORCHRUN" 2>/dev/null && continue
    wait "$TORCHRUN" 2>/dev/null
    again=$?
    [ "$again" -ne 127 ] && status=$again
    break
done
echo "$TAG torchrun exited with status $status"
exit "$status"
