#!/usr/bin/env bash
# Sets up everything the tests need (venvs, the local FHIR server), checks the code (ruff, mypy: config in
# pyproject.toml), and runs the tests.
# Usage: ./run_tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
bash dev/setup_env.sh
.venv/bin/python -m ruff check --quiet pipeline transforms
.venv/bin/python -m mypy --no-error-summary pipeline transforms
exec .venv/bin/python -m pytest "$@"
