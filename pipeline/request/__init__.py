"""The request: the cohort, NDOP's .dat format, and the request builder."""
