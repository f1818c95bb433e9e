"""Beam's Prism runner, built from Beam's Go module by ``dev/build_prism.sh`` so nothing downloads at run time.

Beam's Python SDK ships no Prism binary: ``--runner PrismRunner`` (and ``DirectRunner``, which tries Prism
first) downloads one from GitHub releases unless ``--prism_location`` names a local file. The setup script
builds ``prism`` at the Beam version installed in ``.venv`` into ``.cache/prism/`` (git-ignored); this
module finds it and says how to run a pipeline on it::

    from dev.prism import prism_args
    run([*prism_args(), "--manifest=...", ...])    # PrismRunner, LOOPBACK SDK harness

``NDOP_PRISM`` (a path) overrides the location. The process pipeline reads the same variable
(``pipeline.beam.graph.PRISM_ENV``) when ``--runner PrismRunner`` is given without ``--prism_location``.
"""
from __future__ import annotations

import os
from pathlib import Path

import apache_beam

from pipeline.beam.graph import PRISM_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
PRISM_DIR = REPO_ROOT / ".cache" / "prism"


def default_binary(beam_version: str = apache_beam.__version__) -> Path:
    """Where ``dev/build_prism.sh`` puts the binary for this Beam version."""
    return PRISM_DIR / f"prism-v{beam_version}"


def prism_binary() -> Path | None:
    """The Prism executable (``$NDOP_PRISM``, else the one built for the installed Beam), or None."""
    path = Path(os.environ.get(PRISM_ENV) or default_binary())
    return path if path.is_file() and os.access(path, os.X_OK) else None


def prism_args(binary: Path | None = None, environment_type: str = "LOOPBACK") -> list[str]:
    """Pipeline arguments that run on the local Prism binary; raises when it has not been built."""
    binary = binary or prism_binary()
    if binary is None:
        raise FileNotFoundError(
            f"no Prism binary at {default_binary()} (or ${PRISM_ENV}): run dev/build_prism.sh"
        )
    return ["--runner=PrismRunner", f"--prism_location={binary}", f"--environment_type={environment_type}"]
