#!/usr/bin/env bash
# common.sh: sourced by the other scripts in tpu_scripts/: strict mode, the --dry-run and
# -h/--help flags, and `run`, which prints a command (dry run) or prints and runs it.
# Written for bash 3.2 too (macOS), hence `${a[@]+"${a[@]}"}` for arrays that may be empty.
# shellcheck disable=SC2034  # REPO_ROOT, ARGS, PASS and TPU_FLAGS are for the sourcing scripts.

set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

# On each TPU worker, relative to the home directory: the checkout, its virtual env and the
# training logs (setup.sh, launch.sh and logs.sh must agree on them, so they live here).
# Fixed rather than read from the environment: the workers do not see the caller's variables.
REMOTE_REPO=jaxrec
REMOTE_VENV=jaxrec-venv
REMOTE_LOGS=jaxrec-logs

# The comment block under the calling script's shebang, without the leading "# ".
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

# One word as a shell reads it back: bare when that is safe, else in single quotes. Dry runs
# print whole commands on one line, which can be grepped or pasted into a shell.
shell_word() {
  case $1 in
    '' | *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

shell_line() {
  local sep='' word
  for word in "$@"; do
    printf '%s' "$sep"
    shell_word "$word"
    sep=' '
  done
  printf '\n'
}

# run CMD ARGS...: with DRY_RUN=1 print the command on stdout, else echo it on stderr and run it.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    shell_line "$@"
  else
    { printf '+ '; shell_line "$@"; } >&2
    "$@"
  fi
}

# parse_common_args "$@": handles --dry-run and -h/--help; the other arguments before `--` are
# left in ARGS, those after it in PASS (taken as they are, so they may look like our flags).
parse_common_args() {
  ARGS=()
  PASS=()
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; PASS=("$@"); break ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# The flags that every `gcloud compute tpus tpu-vm` command gets (zone and project are explicit
# rather than taken from the gcloud config, so that a script never acts on another project).
tpu_flags() { TPU_FLAGS=(--zone="$ZONE" --project="$PROJECT"); }
