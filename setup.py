"""Packaging for ndop-sync.

Also what Dataflow stages with ``--setup_file ./setup.py``: the workers install the
``pipeline`` and ``transforms`` packages with ``install_requires`` only, which is what the pipeline's
workers import (Beam, pyarrow/numpy, the FHIR writer's requests/authlib, fhir.resources for the sampled
validation, nhs-number). The launcher (the ``ndop`` command: MESH, reports, metrics, progress bars) needs
the ``launcher`` extra: ``pip install ".[launcher]"``; tests/test_packaging.py checks the split.
"""
from setuptools import find_packages, setup

setup(
    name="ndop-sync",
    version="0.1.0",
    description=(
        "Keep FHIR R4 Consent resources in step with England's National Data Opt-out "
        "(NDOP) via MESH and Apache Beam."
    ),
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*"]),
    install_requires=[
        "apache-beam[gcp]>=2.60,<3",
        "fhir.resources>=8,<9",
        "requests>=2.31,<3",
        "authlib>=1.3,<2",
        "pyarrow>=15,<26",
        "numpy>=1.26,<3",
        "nhs-number>=2.2,<3",
    ],
    extras_require={
        "launcher": [  # the ndop command only; workers never import these
            "mesh-client>=5,<6",
            "matplotlib>=3.8,<4",
            "prometheus-client>=0.20,<1",
            "tqdm>=4.66,<5",
        ],
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",
            "mesh-sandbox>=1.0.130,<2",
            "hypothesis>=6.100,<7",
            "ruff>=0.6,<1",
            "mypy>=1.10,<2",
            "mkdocs>=1.6,<2",  # docs/ (mkdocs.yml): run_tests.sh builds them with --strict
            "uv>=0.9,<1",
            "import-linter>=2.1,<3",  # .importlinter: the layers of pipeline/ and what transforms/ may import  # dev/setup_env.sh installs the locks in requirements/ with it; dev/lock.sh makes them
        ],
    },
    entry_points={"console_scripts": ["ndop=pipeline.cli:main"]},
)
