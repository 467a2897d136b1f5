#!/usr/bin/env bash
# Train on several hosts without SLURM (cloud VMs, bare metal): torchrun on every host, meeting through
# torchrun's c10d rendezvous on the first host. Run the same command on every host, each with its NODE_RANK:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash launch/multinode.sh CONFIG [key=value ...]    # on host0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 bash launch/multinode.sh CONFIG [key=value ...]    # on host1
#
# Required:
#   NNODES          number of hosts
#   NODE_RANK       0 on the host that MASTER_ADDR names (it hosts the rendezvous), 1..NNODES-1 elsewhere.
#                   Training ranks are assigned by the rendezvous, in joining order: global rank 0 may run on
#                   any host; its host then holds the process group's store, and every host must reach it.
#   MASTER_ADDR     address of host 0 that all hosts can reach
# Optional:
#   MASTER_PORT     rendezvous port on host 0 (default 29500; open it between the hosts)
#   NPROC_PER_NODE  training processes per host (default: the host's GPU count, 1 on a host without GPUs)
#   RDZV_ID         rendezvous id, the same on every host (default seg_dist): distinct ids keep two jobs that
#                   share MASTER_ADDR:MASTER_PORT apart
#   MAX_RESTARTS    how many times torchrun restarts this host's worker group after a worker dies (default 3).
#                   A restart restarts every host's workers, which resume from checkpoints/last.pt
#                   (train.resume=auto; set checkpoint.every_steps to lose less than an epoch). Each host counts
#                   its own restarts.
#   RDZV_TIMEOUT    seconds the hosts have to all join (default 900): start them within that
#   LOCAL_ADDR      this host's address as the others reach it (default: its FQDN): set it when the FQDN does
#                   not resolve on the other hosts or resolves to the wrong interface
#   PYTHON          interpreter (default: .venv/bin/python of this repository if there is one, else python)
#   TORCHRUN_ARGS   more torchrun options, split on spaces (e.g. "--monitor-interval=1")
#
# Any host may be started first; the job starts once all NNODES have joined. Exit status: torchrun's (0 when
# every worker finished). A stop (README, "Stopping a run"): SIGUSR1 to the training processes of any one host
# (`pkill -USR1 -P <pid of this script>`: torchrun runs in its place) stops every rank at one step with a
# checkpoint, and every torchrun exits 0. SIGTERM or Ctrl-C to torchrun (what a VM shutdown sends) does the
# same to its workers, but that torchrun then exits 1 with a SignalException traceback. Start the same
# commands again to resume from the checkpoint.
set -euo pipefail

usage() {
    sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    echo "see the header of ${BASH_SOURCE[0]} for the optional variables" >&2
    exit 2
}
[ $# -ge 1 ] || usage
: "${NNODES:?set NNODES (number of hosts); see launch/multinode.sh}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1); see launch/multinode.sh}"
: "${MASTER_ADDR:?set MASTER_ADDR (host 0 address); see launch/multinode.sh}"
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-seg_dist}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-900}
if ! [ "$NODE_RANK" -ge 0 ] 2>/dev/null || ! [ "$NODE_RANK" -lt "$NNODES" ] 2>/dev/null; then
    echo "multinode.sh: NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1)) (NNODES=$NNODES)" >&2
    exit 2
fi
CONFIG=$1
shift

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # seg_dist importable from any working directory

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] 2>/dev/null || NPROC_PER_NODE=1
fi

args=(
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE"
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID"
    # Host 0 hosts the rendezvous store, by rank rather than by torchrun matching MASTER_ADDR to its own
    # names (which fails behind NAT or with DNS aliases, and says yes for every host on 127.0.0.1).
    --rdzv_conf="is_host=$([ "$NODE_RANK" -eq 0 ] && echo 1 || echo 0),join_timeout=$RDZV_TIMEOUT"
    --max_restarts="$MAX_RESTARTS"
)
[ -n "${LOCAL_ADDR:-}" ] && args+=(--local_addr="$LOCAL_ADDR")
# shellcheck disable=SC2206  # split on purpose
[ -n "${TORCHRUN_ARGS:-}" ] && args+=($TORCHRUN_ARGS)

echo "[node $NODE_RANK $(hostname -s)] torchrun: $NNODES host(s) x $NPROC_PER_NODE process(es), rendezvous" \
    "$MASTER_ADDR:$MASTER_PORT id $RDZV_ID, up to $MAX_RESTARTS restart(s)" >&2
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m seg_dist.train --config "$CONFIG" "$@"
