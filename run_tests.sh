#!/usr/bin/env bash
# Sets up everything the tests need (venvs, the local FHIR server) and runs them.
# Usage: ./run_tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
bash dev/setup_env.sh
exec .venv/bin/python -m pytest "$@"
