#!/usr/bin/env bash
# setup.sh: copy this checkout to every worker of a TPU VM and install jaxrec[tpu] there (in a
# virtual env, ~/jaxrec-venv). Run it again after changing the code.
#
# Usage: TPU_NAME=NAME ZONE=ZONE PROJECT=PROJECT tpu_scripts/setup.sh [--dry-run]
#
#   --dry-run   print the commands instead of running them (the work tree is still hashed
#               into git's object store, to name the tree that would be shipped)
#
# What is shipped is the work tree as it is, uncommitted edits and new files included, less
# what .gitignore leaves out (.venv, caches, run folders).
#
# Environment:
#   TPU_NAME, ZONE, PROJECT   required
#   TARBALL                   where to pack the checkout (default: /tmp/jaxrec-$TPU_NAME.tar.gz)

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"
[[ ${#ARGS[@]} -eq 0 && ${#PASS[@]} -eq 0 ]] || die "takes no arguments (see --help)"

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}"
: "${ZONE:?set ZONE to the zone of the TPU VM}"
: "${PROJECT:?set PROJECT to the Google Cloud project}"
TARBALL="${TARBALL:-${TMPDIR:-/tmp}/jaxrec-$TPU_NAME.tar.gz}"

# The work tree as a git tree: staged into a throwaway index, so that the checkout's own index
# (what the user has staged) is left alone, and git's ignore rules choose the files.
tmp="$(mktemp -d)"
GIT_INDEX_FILE="$tmp/index" git -C "$REPO_ROOT" add --all
tree="$(GIT_INDEX_FILE="$tmp/index" git -C "$REPO_ROOT" write-tree)"
rm -rf "$tmp"

tpu_flags
run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" "$tree"
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:jaxrec.tar.gz" --worker=all "${TPU_FLAGS[@]}"
# Unpacked over the previous copy rather than into a fresh folder: a relative --workdir of an
# earlier run lives under it.
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${TPU_FLAGS[@]}" \
  --command="mkdir -p ~/$REMOTE_REPO && tar -xzf ~/jaxrec.tar.gz -C ~/$REMOTE_REPO && bash ~/$REMOTE_REPO/tpu_scripts/worker_setup.sh"
