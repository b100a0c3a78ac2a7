#!/usr/bin/env bash
# worker_setup.sh: runs on each TPU VM worker (setup.sh starts it there): makes a virtual env
# with Python >= 3.11 and installs the checkout around this script into it, as jaxrec[tpu].
#
# Usage: tpu_scripts/worker_setup.sh [--dry-run]
#
# Environment:
#   PYTHON   the interpreter to build the env from (default python3; when it is older than
#            3.11, as on Ubuntu 22.04 TPU images, python3.11 is installed with apt-get)
#   VENV     the virtual env (default ~/jaxrec-venv)

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"
[[ ${#ARGS[@]} -eq 0 && ${#PASS[@]} -eq 0 ]] || die "takes no arguments (see --help)"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$HOME/$REMOTE_VENV}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  run sudo apt-get update -q
  run sudo apt-get install -y -q python3.11 python3.11-venv
  PYTHON=python3.11
fi
run "$PYTHON" -m venv "$VENV"
run "$VENV/bin/pip" install -q --upgrade pip
run "$VENV/bin/pip" install -q -e "${REPO_ROOT}[tpu]"
