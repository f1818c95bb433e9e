#!/usr/bin/env bash
# Builds what Flink runs need into .cache/flink and .venv-flink (all git-ignored); safe to run again.
# Called by dev/setup_env.sh (NDOP_WITH_FLINK=0 skips it). Needs java (17) and mvn on PATH. See dev/flink.py.
#   1. the Flink 1.19.3 jars from PyPI's apache-flink-libraries sdist (downloaded, unpacked, not installed:
#      the apache-flink package itself pins an apache-beam < 2.49)
#   2. Beam 2.62.0's Flink 1.19 job server: beam-runners-flink-1.19 + beam-runners-java-job-service from
#      Maven Central (mvn dependency:copy-dependencies, 161 jars) and a jar whose manifest names them
#   3. .venv-flink with Python apache-beam==2.62.0 and the pipeline's own requirements
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
FLINK=1.19.3
BEAM=2.62.0
CACHE="$ROOT/.cache/flink"
mkdir -p "$CACHE/pypi"

if [ ! -f "$CACHE/apache-flink-libraries-$FLINK/deps/lib/flink-dist-$FLINK.jar" ]; then
  echo "fetching Flink $FLINK (apache-flink-libraries sdist, 230 MB)" >&2
  "$ROOT/.venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$CACHE/pypi" "apache-flink-libraries==$FLINK"
  tar -xzf "$CACHE/pypi/apache-flink-libraries-$FLINK.tar.gz" -C "$CACHE" \
    "apache-flink-libraries-$FLINK/deps/lib" "apache-flink-libraries-$FLINK/deps/bin"
fi

JAR="$CACHE/beam-runners-flink-1.19-job-server-$BEAM.jar"
if [ ! -f "$JAR" ]; then
  echo "fetching Beam $BEAM's Flink 1.19 runner and job service with mvn" >&2
  cat > "$CACHE/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>ndop</groupId><artifactId>flink-job-server</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.beam</groupId><artifactId>beam-runners-flink-1.19</artifactId><version>$BEAM</version></dependency>
    <dependency><groupId>org.apache.beam</groupId><artifactId>beam-runners-java-job-service</artifactId><version>$BEAM</version></dependency>
  </dependencies>
</project>
POM
  (cd "$CACHE" && mvn -q -B -Dmaven.repo.local="$ROOT/.cache/m2" dependency:copy-dependencies \
     -DoutputDirectory=lib -DincludeScope=runtime)
  "$ROOT/.venv/bin/python" - "$CACHE" "$JAR" <<'PY'
import sys, zipfile
from pathlib import Path
cache, jar = Path(sys.argv[1]), Path(sys.argv[2])
line = "Class-Path: " + " ".join(f"lib/{p.name}" for p in sorted((cache / "lib").glob("*.jar")))
lines = []
while len(line) > 70:  # manifest lines: at most 72 bytes, continued with a leading space
    lines.append(line[:70]); line = " " + line[70:]
lines.append(line)
manifest = "Manifest-Version: 1.0\r\nMain-Class: org.apache.beam.runners.flink.FlinkJobServerDriver\r\n"
with zipfile.ZipFile(f"{jar}.tmp", "w") as out:
    out.writestr("META-INF/MANIFEST.MF", manifest + "\r\n".join(lines) + "\r\n\r\n")
Path(f"{jar}.tmp").rename(jar)
PY
fi

if [ ! -x "$ROOT/.venv-flink/bin/python" ] || ! "$ROOT/.venv-flink/bin/python" -c "import apache_beam, fhir.resources, nhs_number" 2>/dev/null; then
  echo "setting up $ROOT/.venv-flink (apache-beam==$BEAM)" >&2
  "$PYTHON" -m venv "$ROOT/.venv-flink"
  "$ROOT/.venv-flink/bin/python" -m pip install -q --disable-pip-version-check "apache-beam==$BEAM" \
    "fhir.resources>=8,<9" "requests>=2.31,<3" "authlib>=1.3,<2" "nhs-number>=2.2,<3" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$ROOT/.venv-flink/bin/python" -c "import apache_beam, fhir.resources, nhs_number" \
    || { echo "setup failed: $ROOT/.venv-flink is incomplete" >&2; exit 1; }
fi
