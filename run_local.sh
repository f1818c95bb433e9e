#!/usr/bin/env bash
# Sets up and runs ndop-sync on the embedded local default (work in progress).
set -euo pipefail
cd "$(dirname "$0")"
bash dev/setup_env.sh
echo "nothing to run yet" >&2
