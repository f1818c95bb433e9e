"""Shared ground: NHS numbers, errors and exit codes, private files, settings, the clock, logging, crash points."""
