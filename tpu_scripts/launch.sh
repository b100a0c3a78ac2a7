#!/usr/bin/env bash
# launch.sh: start `jaxrec train --distributed TRAIN_ARGS` on every worker of a TPU VM, in the
# background (nohup, so it outlives the ssh session). Each worker logs to its own disk:
# ~/jaxrec-logs/train-STAMP.log, with ~/jaxrec-logs/train.log linking to the newest.
#
# Usage: TPU_NAME=NAME ZONE=ZONE PROJECT=PROJECT \
#          tpu_scripts/launch.sh [--dry-run] [--] --config FILE --workdir DIR [--set KEY=VALUE]...
#        TPU_NAME=NAME ZONE=ZONE PROJECT=PROJECT tpu_scripts/launch.sh [--dry-run] --stop
#
#   --dry-run    print the gcloud command instead of running it
#   --stop       stop the training that the last launch started, on every worker
#   the rest     passed to `jaxrec train` as they are (all of it after `--`). --config is a
#                path in the checkout that setup.sh copied (e.g. configs/ml1m-tpu-v5e-8.yaml).
#                --workdir DIR: a path all workers share (a gcsfuse mount of a bucket)
#                (they outlive the TPU VM); a local path is on each worker's own disk (relative
#                to ~/jaxrec).
#
# All workers run the same command; --distributed lets JAX find the slice's other hosts itself.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"

STOP=0
TRAIN_ARGS=()
for arg in ${ARGS[@]+"${ARGS[@]}"}; do
  if [[ $arg == --stop ]]; then STOP=1; else TRAIN_ARGS+=("$arg"); fi
done
TRAIN_ARGS+=(${PASS[@]+"${PASS[@]}"})

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}"
: "${ZONE:?set ZONE to the zone of the TPU VM}"
: "${PROJECT:?set PROJECT to the Google Cloud project}"
tpu_flags
# shellcheck disable=SC2088  # the tilde is for the worker's shell to expand
logs="~/$REMOTE_LOGS"

if [[ $STOP == 1 ]]; then
  # `|| true`: a worker whose process has already ended is not an error.
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${TPU_FLAGS[@]}" \
    --command="kill \$(cat $logs/train.pid) || true"
  exit 0
fi

# Checked here: on the workers a missing --workdir would only show in the logs.
has_workdir=0
for arg in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do
  case $arg in --workdir | --workdir=*) has_workdir=1 ;; esac
done
[[ $has_workdir == 1 ]] || die "pass --workdir DIR (and --config FILE) for jaxrec train"

# Quoted for the worker's shell, which reads the command line again.
printf -v train_args ' %q' "${TRAIN_ARGS[@]}"
# One stamp for all workers (taken here), so that their logs of one run share a name.
log="train-$(date -u +%Y%m%d-%H%M%S).log"
# In braces, `&` backgrounds nohup alone, so $! is the training process (for --stop); with
# every stream redirected the ssh session can end while it runs.
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${TPU_FLAGS[@]}" \
  --command="cd ~/$REMOTE_REPO && mkdir -p $logs && ln -sfn $log $logs/train.log && { nohup ~/$REMOTE_VENV/bin/jaxrec train --distributed$train_args > $logs/$log 2>&1 < /dev/null & echo \$! > $logs/train.pid; }"
