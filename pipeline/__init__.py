"""ndop-sync: the non-Beam half (request builder, MESH driver, CLI) and pipeline assembly."""
