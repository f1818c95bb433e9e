"""Beam PTransforms and DoFns of the process pipeline, one concept a module."""
