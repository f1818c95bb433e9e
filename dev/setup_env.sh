#!/usr/bin/env bash
# Creates (or refreshes) the two virtual environments this project needs; safe to run again.
#   .venv       the project with its test extras (apache-beam, mesh-client, mesh-sandbox, ...)
#   .venv-fhir  the local FHIR R4 test server, sekmet-fhir: it pins a FastAPI that mesh-sandbox
#               cannot share, so it lives apart (docs/fhir-stores.md).
#   .cache/hapi the HAPI FHIR test server (dev/hapi, Java 17 + Maven), built only when missing or when
#               dev/hapi changed; its Maven build runs in the background while pip fills the venvs.
# Sourced by run_tests.sh and run_local.sh; needs only python3 (3.11+) on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
SEKMET_VERSION="0.1.1"

_stamp() { sha256sum "$ROOT/setup.py" | cut -c1-16; }
_hapi_stamp() { (cd "$ROOT/dev/hapi" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); }

HAPI_CACHE="$ROOT/.cache/hapi"
HAPI_PID=""
# NDOP_WITH_HAPI=0 skips it (run_local.sh: the local default runs on sekmet, so a new user needs no Java or Maven).
if [ "${NDOP_WITH_HAPI:-1}" != "0" ] && { [ "$(cat "$HAPI_CACHE/.ndop-stamp" 2>/dev/null)" != "$(_hapi_stamp)" ] \
     || [ ! -f "$HAPI_CACHE/classpath.txt" ]; }; then
  command -v mvn >/dev/null && command -v java >/dev/null \
    || { echo "setup failed: the HAPI test server needs java (17) and mvn on PATH" >&2; exit 1; }
  echo "building the HAPI FHIR test server into $HAPI_CACHE (first time: about three minutes)" >&2
  mkdir -p "$HAPI_CACHE"
  ( cd "$ROOT/dev/hapi" && mvn -q -B -Dmaven.repo.local="$HAPI_CACHE/m2" package ) > "$HAPI_CACHE/build.log" 2>&1 &
  HAPI_PID=$!
fi

if [ ! -x "$ROOT/.venv/bin/python" ] || [ "$(cat "$ROOT/.venv/.ndop-stamp" 2>/dev/null)" != "$(_stamp)" ]; then
  echo "setting up $ROOT/.venv (first time: about two minutes)" >&2
  "$PYTHON" -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$ROOT/.venv/bin/python" -c "import apache_beam, mesh_client, mesh_sandbox, nhs_number, fhir.resources, hypothesis, pipeline" \
    || { echo "setup failed: $ROOT/.venv is incomplete" >&2; exit 1; }
  _stamp > "$ROOT/.venv/.ndop-stamp"
fi

if [ ! -x "$ROOT/.venv-fhir/bin/sekmet" ]; then
  echo "setting up $ROOT/.venv-fhir (the local FHIR server, sekmet-fhir==$SEKMET_VERSION)" >&2
  "$PYTHON" -m venv "$ROOT/.venv-fhir"
  "$ROOT/.venv-fhir/bin/python" -m pip install -q --disable-pip-version-check "sekmet-fhir==$SEKMET_VERSION" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  [ -x "$ROOT/.venv-fhir/bin/sekmet" ] || { echo "setup failed: no sekmet in $ROOT/.venv-fhir" >&2; exit 1; }
fi

# Headless Chromium for the report-page test (tests/test_report_html.py); Debian's package, only when missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing chromium (apt-get) for the report-page test" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >&2 \
    || echo "warning: chromium did not install; the browser test will fail" >&2
fi

# Flink 1.19 + Beam 2.62's Flink job server + .venv-flink (tests marked `flink`); NDOP_WITH_FLINK=0 skips it.
# Mostly downloads, so it runs in the background while Prism compiles.
FLINK_PID=""
if [ "${NDOP_WITH_FLINK:-1}" != "0" ]; then
  bash "$ROOT/dev/build_flink.sh" &
  FLINK_PID=$!
fi

# Beam's Prism runner, built from Beam's Go module (tests marked `prism`); NDOP_WITH_PRISM=0 skips it.
if [ "${NDOP_WITH_PRISM:-1}" != "0" ]; then
  bash "$ROOT/dev/build_prism.sh"
fi

if [ -n "$FLINK_PID" ]; then
  wait "$FLINK_PID" || { echo "setup failed: the Flink build (dev/build_flink.sh) failed" >&2; exit 1; }
fi

if [ -n "$HAPI_PID" ]; then
  wait "$HAPI_PID" || { echo "setup failed: HAPI build (log: $HAPI_CACHE/build.log):" >&2; tail -20 "$HAPI_CACHE/build.log" >&2; exit 1; }
  _hapi_stamp > "$HAPI_CACHE/.ndop-stamp"
fi

