#!/usr/bin/env bash
# gpu.sh: run `jaxrec train` on GPU machines. One process per host, which sees all of the
# host's GPUs: on one host that is a plain `jaxrec train`; on several, every host runs this
# script and the processes meet at a coordinator (process 0's host).
#
# Usage: tpu_scripts/gpu.sh [--dry-run] [--install]
#          [--coordinator HOST[:PORT] --num-processes N --process-id I] [--] TRAIN_ARGS...
#
#   --dry-run          print the commands instead of running them
#   --install          first pip install this checkout as jaxrec[cuda] (once per host or
#                      shared env: run it alone, before srun starts one copy per node)
#   --coordinator ...  several hosts, set up by hand: all three flags, on each host, with its
#                      own --process-id (0 on the coordinator's host)
#   TRAIN_ARGS         passed to `jaxrec train` as they are: --config, --workdir, --set ...
#
# Under SLURM (srun with one task per node) the three come from SLURM_NTASKS, SLURM_PROCID and
# the first host of SLURM_JOB_NODELIST (through `scontrol show hostnames`); when that host
# cannot be read, `--distributed` leaves it to JAX's own SLURM detection.
#
# Environment:
#   COORDINATOR_PORT   the coordinator's port (default: from SLURM_JOB_ID as JAX picks it, so
#                      that jobs sharing a node differ; 8476 outside SLURM)
#   PYTHON             the interpreter that --install uses (default python3)

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"

INSTALL=0
COORDINATOR=""
NUM_PROCESSES=""
PROCESS_ID=""
TRAIN_ARGS=()
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --install) INSTALL=1 ;;
    --coordinator) COORDINATOR="${2:?--coordinator needs HOST[:PORT]}"; shift ;;
    --num-processes) NUM_PROCESSES="${2:?--num-processes needs a count}"; shift ;;
    --process-id) PROCESS_ID="${2:?--process-id needs a number}"; shift ;;
    *) TRAIN_ARGS+=("$1") ;;
  esac
  shift
done
TRAIN_ARGS+=(${PASS[@]+"${PASS[@]}"})

default_port() {
  if [[ -n ${COORDINATOR_PORT:-} ]]; then
    echo "$COORDINATOR_PORT"
  elif [[ -n ${SLURM_JOB_ID:-} ]]; then
    echo $((SLURM_JOB_ID % 4096 + 61440))  # JAX's own choice: in [61440, 65535]
  else
    echo 8476
  fi
}

# The first host of the job, or nothing when neither scontrol nor a plain list gives it.
first_slurm_host() {
  local nodes="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" host=""
  if command -v scontrol >/dev/null 2>&1; then
    host="$(scontrol show hostnames "$nodes" 2>/dev/null | sed -n 1p)" || host=""
  fi
  if [[ -z $host && $nodes != *'['* ]]; then
    host="${nodes%%,*}"  # a plain list, node1,node2 (node[1-2] needs scontrol to expand)
  fi
  echo "$host"
}

DIST=()
if [[ -n $COORDINATOR$NUM_PROCESSES$PROCESS_ID ]]; then
  [[ -n $COORDINATOR && -n $NUM_PROCESSES && -n $PROCESS_ID ]] ||
    die "--coordinator, --num-processes and --process-id go together"
  [[ $COORDINATOR == *:* ]] || COORDINATOR="$COORDINATOR:$(default_port)"
  DIST=(--coordinator "$COORDINATOR" --num-processes "$NUM_PROCESSES" --process-id "$PROCESS_ID")
elif [[ -n ${SLURM_PROCID:-} && ${SLURM_NTASKS:-1} -gt 1 ]]; then
  host="$(first_slurm_host)"
  if [[ -n $host ]]; then
    DIST=(--coordinator "$host:$(default_port)" --num-processes "$SLURM_NTASKS"
      --process-id "$SLURM_PROCID")
  else
    DIST=(--distributed)
  fi
fi

if [[ $INSTALL == 1 ]]; then
  run "${PYTHON:-python3}" -m pip install -e "${REPO_ROOT}[cuda]"
  # --install alone: only install (e.g. before srun starts the training on every node).
  [[ ${#TRAIN_ARGS[@]} -gt 0 ]] || exit 0
fi
run jaxrec train ${DIST[@]+"${DIST[@]}"} ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
