#!/usr/bin/env bash
# Builds Beam's Prism runner from Beam's Go module at the Beam version installed in .venv, into
# .cache/prism/prism-v<version> (git-ignored), so PrismRunner never downloads a binary at run time.
# Go's module and build caches live in .cache/go, so a second run only checks the binary is there.
# Needs `go` on PATH (the polyglot machines have it). Called by dev/setup_env.sh unless NDOP_WITH_PRISM=0.
# Measured (2026-12-03, 2-core machine): module download ~22 s (870 MB, the whole Beam Go module graph);
# compile from an empty build cache 2-2.6 min of CPU: 3.0 min wall at load 3-7, 5 min wall at load 9-11.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="$("$ROOT/.venv/bin/python" -c 'import apache_beam; print(apache_beam.__version__)')"
OUT="$ROOT/.cache/prism/prism-v$VERSION"
[ -x "$OUT" ] && exit 0
command -v go >/dev/null || { echo "build_prism: no 'go' on PATH; set NDOP_WITH_PRISM=0 to skip Prism" >&2; exit 1; }
export GOPATH="$ROOT/.cache/go" GOMODCACHE="$ROOT/.cache/go/mod" GOCACHE="$ROOT/.cache/go/build"
export GOFLAGS="-modcacherw" GOTOOLCHAIN=local CGO_ENABLED=0
MOD="$ROOT/.cache/prism/module"
mkdir -p "$MOD" "$ROOT/.cache/prism"
echo "building Prism v$VERSION from Beam's Go module into $OUT (first time: a few minutes)" >&2
cd "$MOD"
[ -f go.mod ] || go mod init ndop-prism-build >/dev/null 2>&1
start=$(date +%s)
go get "github.com/apache/beam/sdks/v2/go/cmd/prism@v$VERSION" 2>&1 | grep -v "^go: downloading" >&2 || true
fetched=$(date +%s)
go build -trimpath -ldflags='-s -w' -o "$OUT.tmp" github.com/apache/beam/sdks/v2/go/cmd/prism
mv "$OUT.tmp" "$OUT"
echo "Prism v$VERSION built: modules $((fetched - start)) s, compile $(( $(date +%s) - fetched )) s" >&2
