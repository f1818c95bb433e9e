#!/usr/bin/env bash
# Sets up everything the tests need (venvs, the local FHIR servers, Prism, Flink), checks the code (ruff, mypy:
# config in pyproject.toml; import-linter: .importlinter) and the docs/ pages (mkdocs build --strict: no dead
# link), and runs the tests.
#   ./run_tests.sh [pytest arguments]        stage 1: every test but the second stage's, two workers (xdist)
#   ./run_tests.sh --all [pytest arguments]  stage 1, then stage 2 (what CI runs): the slow end-to-end tests (two
#                                            workers), then the HAPI FHIR, Prism and Flink tests (one process)
set -euo pipefail
cd "$(dirname "$0")"
STAGE2="hapi or prism or flink"
SLOW="slow and not ($STAGE2)"
ALL=0
if [ "${1:-}" = "--all" ]; then ALL=1; shift; fi
bash dev/setup_env.sh
.venv/bin/python -m ruff check --quiet pipeline transforms
.venv/bin/python -m mypy --no-error-summary pipeline transforms
# .importlinter: the layers of pipeline/, what transforms/ (the workers' code) may import, no import circle
LAYERS="$(.venv/bin/lint-imports --no-logo --no-cache 2>&1)" || { echo "$LAYERS" >&2; exit 1; }
# The docs/ pages (mkdocs.yml): --strict fails on a dead link or anchor; its log is shown only when it fails.
DOCS_SITE="$(mktemp -d)"
.venv/bin/python -m mkdocs build --strict --site-dir "$DOCS_SITE" > "$DOCS_SITE.log" 2>&1 \
  || { cat "$DOCS_SITE.log" >&2; echo "docs: mkdocs build --strict failed (above)" >&2; exit 1; }
rm -rf "$DOCS_SITE" "$DOCS_SITE.log"
if [ "$#" -gt 0 ] && [ "$ALL" = 0 ]; then  # arguments given: exactly what they select, in one process
  exec .venv/bin/python -m pytest "$@"
fi
echo "stage 1: pytest -n 2 -m 'not ($STAGE2 or slow)'" >&2
.venv/bin/python -m pytest -n 2 -m "not ($STAGE2 or slow)" "$@"
if [ "$ALL" = 1 ]; then
  echo "stage 2: pytest -n 2 -m '$SLOW', then pytest -m '$STAGE2'" >&2
  .venv/bin/python -m pytest -n 2 -m "$SLOW" "$@" || [ $? = 5 ]  # 5: none selected by the arguments given
  .venv/bin/python -m pytest -m "$STAGE2" "$@" || [ $? = 5 ]
fi
