"""Test pipelines on the in-process runner (DirectRunner would first try to download Prism here)."""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline

TestPipeline.__test__ = False  # not a pytest test class

RUNNER_ARGS = ["--runner=FnApiRunner"]


def local_pipeline() -> TestPipeline:
    return TestPipeline(options=PipelineOptions(RUNNER_ARGS))
