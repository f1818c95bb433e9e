"""Issue 24 item 3: workers install only what they import; the launcher's packages are the ``launcher`` extra."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import runpy
from typing import Any

import setuptools

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_ONLY = ("mesh_client", "matplotlib", "prometheus_client", "tqdm")
# What a worker unpickles and imports: the process pipeline's module and every transform.
WORKER_MODULES = ("pipeline.beam.graph", "transforms.build_consent", "transforms.dead_letters", "transforms.join",
                  "transforms.ledger_join", "transforms.provenance", "transforms.read_inputs", "transforms.shards",
                  "transforms.vocabulary", "transforms.write_consents", "transforms.consent_ids",
                  "transforms.apply_opt_outs", "pipeline.fhir.config", "pipeline.fhir.answers", "pipeline.fhir.retry",
                  "pipeline.fhir.sessions", "pipeline.fhir.search")

_BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is a launcher-only package, imported on a worker")
sys.meta_path.insert(0, Blocker())
for module in sys.argv[2].split(","):
    __import__(module)
print("ok")
"""


def _setup_args(monkeypatch) -> dict[str, Any]:
    """The keyword arguments setup.py passes to ``setup()`` (nothing is built)."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: seen.update(kwargs))
    monkeypatch.chdir(REPO_ROOT)
    runpy.run_path(str(REPO_ROOT / "setup.py"))
    return seen


def _names(requirements: list[str]) -> set[str]:
    return {r.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().replace("-", "_") for r in requirements}


def test_workers_install_no_launcher_package(monkeypatch):
    args = _setup_args(monkeypatch)
    worker = _names(args["install_requires"])
    launcher = _names(args["extras_require"]["launcher"])
    assert launcher == set(LAUNCHER_ONLY)
    assert not worker & launcher
    assert {"apache_beam", "pyarrow", "numpy", "requests", "authlib", "fhir.resources", "nhs_number"} <= worker


def test_worker_modules_import_without_the_launcher_packages():
    done = subprocess.run([sys.executable, "-c", _BLOCKER, ",".join(LAUNCHER_ONLY), ",".join(WORKER_MODULES)],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_blocker_does_block():
    """The check above could fail: the launcher's own module does import a launcher-only package."""
    done = subprocess.run([sys.executable, "-c", _BLOCKER, ",".join(LAUNCHER_ONLY), "pipeline.mesh.transport"],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "launcher-only" in done.stderr
