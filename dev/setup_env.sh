#!/usr/bin/env bash
# Creates (or refreshes) the two virtual environments this project needs; safe to run again.
#   .venv       the project with its test extras (apache-beam, mesh-client, mesh-sandbox, ...), exactly as
#               locked in requirements/test.txt (hashes checked); refreshed when that lock or setup.py changes
#   .venv-fhir  the local FHIR R4 test server, sekmet-fhir (requirements/fhir-server.txt): it pins a FastAPI
#               that mesh-sandbox cannot share, so it lives apart (docs/fhir-stores.md).
#   .cache/hapi the HAPI FHIR test server (dev/hapi, Java 17 + Maven), built only when missing or when
#               dev/hapi changed; its Maven build runs in the background while pip fills the venvs.
# Sourced by run_tests.sh and run_local.sh; needs only python3 (3.11+) on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

_stamp() { cat "$ROOT/setup.py" "$ROOT/requirements/test.txt" | sha256sum | cut -c1-16; }
_fhir_stamp() { sha256sum "$ROOT/requirements/fhir-server.txt" | cut -c1-16; }
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

# Python packages come from the locks in requirements/ (exact versions, SHA-256 hashes; `dev/lock.sh` regenerates
# them after a change to setup.py), installed by uv (itself installed first by pip, checked by its hash).
UV="$ROOT/.venv/bin/uv"
_pip() { "$1" -m pip install -q --disable-pip-version-check "${@:2}" 2>&1 | grep -v "^WARNING: Location" >&2 || true; }
_install() {  # _install VENV_PYTHON ARGS...: uv when .venv has it, else pip (same arguments)
  if [ -x "$UV" ]; then "$UV" pip install -q --python "$1" "${@:2}" >&2; else _pip "$@"; fi
}

if [ ! -x "$ROOT/.venv/bin/python" ] || [ "$(cat "$ROOT/.venv/.ndop-stamp" 2>/dev/null)" != "$(_stamp)" ]; then
  if [ -L "$ROOT/.venv" ] && [ -x "$ROOT/.venv/bin/python" ]; then
    # a link to another checkout's venv (a git worktree sharing one): that checkout sets it up, never this one
    echo "warning: $ROOT/.venv links to $(readlink -f "$ROOT/.venv"), set up for other requirements; left as it is" >&2
  else
    echo "setting up $ROOT/.venv from requirements/test.txt (first time: under a minute with a warm download cache, 2-3 minutes without)" >&2
    "$PYTHON" -m venv "$ROOT/.venv"
    _pip "$ROOT/.venv/bin/python" --require-hashes --no-deps -r "$ROOT/requirements/uv.txt"
    _install "$ROOT/.venv/bin/python" --require-hashes -r "$ROOT/requirements/test.txt"
    _install "$ROOT/.venv/bin/python" --no-deps -e "$ROOT"  # the project itself (its requirements are locked above)
    "$ROOT/.venv/bin/python" -c "import apache_beam, mesh_client, mesh_sandbox, nhs_number, fhir.resources, hypothesis, mkdocs, pipeline" \
      || { echo "setup failed: $ROOT/.venv is incomplete" >&2; exit 1; }
    _stamp > "$ROOT/.venv/.ndop-stamp"
  fi
fi

if [ ! -x "$ROOT/.venv-fhir/bin/sekmet" ] || [ "$(cat "$ROOT/.venv-fhir/.ndop-stamp" 2>/dev/null)" != "$(_fhir_stamp)" ]; then
  if [ -L "$ROOT/.venv-fhir" ] && [ -x "$ROOT/.venv-fhir/bin/sekmet" ]; then
    echo "warning: $ROOT/.venv-fhir links to $(readlink -f "$ROOT/.venv-fhir"); left as it is" >&2
  else
    echo "setting up $ROOT/.venv-fhir (the local FHIR server, from requirements/fhir-server.txt)" >&2
    "$PYTHON" -m venv "$ROOT/.venv-fhir"
    _install "$ROOT/.venv-fhir/bin/python" --require-hashes -r "$ROOT/requirements/fhir-server.txt"
    [ -x "$ROOT/.venv-fhir/bin/sekmet" ] || { echo "setup failed: no sekmet in $ROOT/.venv-fhir" >&2; exit 1; }
    _fhir_stamp > "$ROOT/.venv-fhir/.ndop-stamp"
  fi
fi

# Headless Chromium for the report-page test (tests/test_ops.py, tests/browser.py); Debian's package, only when missing.
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

