"""Developer and test tooling; not part of the installed package."""
