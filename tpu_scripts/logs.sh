#!/usr/bin/env bash
# logs.sh: fetch the training log of the latest launch from every worker of a TPU VM, one
# file per worker (DIR/0.log, DIR/1.log, ...), or follow worker 0's log as it grows.
#
# Usage: TPU_NAME=NAME ZONE=ZONE PROJECT=PROJECT tpu_scripts/logs.sh [--dry-run] [--follow] [DIR]
#
#   --dry-run   print the commands instead of running them
#   --follow    print worker 0's log and follow it (Ctrl-C to stop); nothing is saved
#   DIR         where to save the logs (default: tpu-logs/$TPU_NAME)

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"

FOLLOW=0
DIR=""
for arg in ${ARGS[@]+"${ARGS[@]}"} ${PASS[@]+"${PASS[@]}"}; do
  case $arg in
    --follow) FOLLOW=1 ;;
    -*) die "unknown option $arg (see --help)" ;;
    *) [[ -z $DIR ]] || die "one DIR at most"; DIR="$arg" ;;
  esac
done

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}"
: "${ZONE:?set ZONE to the zone of the TPU VM}"
: "${PROJECT:?set PROJECT to the Google Cloud project}"
tpu_flags
DIR="${DIR:-tpu-logs/$TPU_NAME}"

if [[ $FOLLOW == 1 ]]; then
  # Worker 0 only: every worker logs the same steps, and several live streams would interleave.
  # tail -F waits for the file and follows train.log to a newer run's log.
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=0 "${TPU_FLAGS[@]}" \
    --command="tail -n 100 -F ~/$REMOTE_LOGS/train.log"
else
  # gcloud writes what each worker prints to DIR/WORKER.log; the folder must exist.
  run mkdir -p "$DIR"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${TPU_FLAGS[@]}" \
    --command="cat ~/$REMOTE_LOGS/train.log" --output-directory="$DIR"
fi
