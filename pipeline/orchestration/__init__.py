"""Putting the steps together: the scheduled run, the process step, the reply's plausibility."""
