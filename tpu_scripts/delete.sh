#!/usr/bin/env bash
# delete.sh: delete a TPU VM (all workers of a slice) and its boot disks. What a run wrote to a
# local --workdir goes with it: fetch it first, or use a shared one (a gcsfuse-mounted bucket).
#
# Usage: TPU_NAME=NAME ZONE=ZONE PROJECT=PROJECT tpu_scripts/delete.sh [--dry-run] [-- GCLOUD_FLAGS...]
#
#   --dry-run      print the gcloud command instead of running it
#   GCLOUD_FLAGS   more flags for `gcloud compute tpus tpu-vm delete`, e.g. --quiet to skip
#                  gcloud's confirmation prompt, --async not to wait

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM to delete}"
: "${ZONE:?set ZONE to the zone of the TPU VM}"
: "${PROJECT:?set PROJECT to the Google Cloud project}"
tpu_flags
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU_FLAGS[@]}" \
  ${ARGS[@]+"${ARGS[@]}"} ${PASS[@]+"${PASS[@]}"}
