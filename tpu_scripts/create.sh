#!/usr/bin/env bash
# create.sh: create a Cloud TPU VM: one host (e.g. v5litepod-8, a v5e-8) or a multi-host slice
# (e.g. v4-32: 4 hosts of 4 chips).
#
# Usage: TPU_NAME=NAME ZONE=ZONE PROJECT=PROJECT ACCELERATOR_TYPE=TYPE \
#          tpu_scripts/create.sh [--dry-run] [-- GCLOUD_FLAGS...]
#
#   --dry-run        print the gcloud command instead of running it
#   GCLOUD_FLAGS     more flags for `gcloud compute tpus tpu-vm create`, e.g. --spot
#
# Environment:
#   TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE   required
#   RUNTIME_VERSION  TPU software version; by default the one Google recommends for v4, v5e,
#                    v5p and v6e (required for other types)
#
# Example: TPU_NAME=rec ZONE=us-central2-b PROJECT=my-proj ACCELERATOR_TYPE=v4-32 \
#            tpu_scripts/create.sh -- --spot

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM to create}"
: "${ZONE:?set ZONE to a zone that has the accelerator type, e.g. us-central2-b}"
: "${PROJECT:?set PROJECT to the Google Cloud project}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v5litepod-8 or v4-32}"

if [[ -z ${RUNTIME_VERSION:-} ]]; then
  case $ACCELERATOR_TYPE in
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
  esac
fi
: "${RUNTIME_VERSION:?set RUNTIME_VERSION (the TPU software version) for $ACCELERATOR_TYPE}"

tpu_flags
run gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU_FLAGS[@]}" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
  ${ARGS[@]+"${ARGS[@]}"} ${PASS[@]+"${PASS[@]}"}
