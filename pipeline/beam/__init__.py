"""The Beam side of the process step: options, the pipeline graph, progress; `ndop filter`'s job."""
