#!/usr/bin/env bash
# Sets up (first time) and runs ndop-sync end to end on the embedded local default:
# a local MESH sandbox playing NDOP, a local FHIR R4 server, a synthetic cohort, Beam's local runner.
# Usage: ./run_local.sh [--size N] [--seed S] [--fresh] [--keep-running]   (see --help)
set -euo pipefail
cd "$(dirname "$0")"
# The local default runs on Beam's in-process runner and the sekmet FHIR server: it needs neither Prism, Flink nor
# HAPI FHIR (the tests build those), so neither Go nor Java and Maven.
NDOP_WITH_PRISM="${NDOP_WITH_PRISM:-0}" NDOP_WITH_FLINK="${NDOP_WITH_FLINK:-0}" NDOP_WITH_HAPI="${NDOP_WITH_HAPI:-0}" \
  bash dev/setup_env.sh
exec .venv/bin/python -m dev.local_run "$@"
