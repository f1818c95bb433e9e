#!/usr/bin/env bash
# Regenerates the locks under requirements/ (exact versions with their SHA-256 hashes) that dev/setup_env.sh,
# and so run_tests.sh, run_local.sh and CI, install from. Run it after changing setup.py's requirements or
# extras, and commit what it changes:
#
#   dev/lock.sh              keep every locked version that still satisfies setup.py (only what changed moves)
#   dev/lock.sh --upgrade    move everything to the newest versions setup.py allows
#
#   requirements/test.txt         .venv: setup.py's install_requires + the `launcher` and `test` extras (what the
#                                 tests ran with)
#   requirements/runtime.txt      install_requires + the `launcher` extra: a production install of the ndop command
#                                 (docs/deployers.md); Beam workers install setup.py's install_requires only
#   requirements/fhir-server.txt  .venv-fhir: the local FHIR test server, sekmet-fhir (its own venv: its FastAPI
#                                 cannot share one with mesh-sandbox)
#   requirements/uv.txt           uv itself, which setup installs first (with pip, checked by hash) to install the rest
#
# Resolved with uv for Python 3.11 on any platform (--universal). Needs network access to PyPI; uses .venv/bin/uv
# when setup has run, else installs uv into a throwaway venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/requirements"
UV="$ROOT/.venv/bin/uv"
if [ ! -x "$UV" ]; then
  TOOLS="$(mktemp -d)"
  trap 'rm -rf "$TOOLS"' EXIT
  "${PYTHON:-python3}" -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install -q --disable-pip-version-check uv
  UV="$TOOLS/venv/bin/uv"
fi
COMPILE=("$UV" pip compile --quiet --generate-hashes --universal --python-version 3.11
         --custom-compile-command "dev/lock.sh" "$@")
mkdir -p "$OUT"
cd "$ROOT"
"${COMPILE[@]}" setup.py --extra launcher --extra test -o "$OUT/test.txt"
"${COMPILE[@]}" setup.py --extra launcher -c "$OUT/test.txt" -o "$OUT/runtime.txt"  # the versions the tests ran with
printf 'sekmet-fhir==0.1.1\n' | "${COMPILE[@]}" - -o "$OUT/fhir-server.txt"
grep -E '^uv==' "$OUT/test.txt" | sed 's/ .*//' | "${COMPILE[@]}" - -o "$OUT/uv.txt"
echo "locked: $(cd "$OUT" && for f in test runtime fhir-server uv; do printf '%s.txt (%s packages) ' "$f" "$(grep -c '==' "$f.txt")"; done)" >&2
