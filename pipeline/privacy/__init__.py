"""Data protection: purge, the Consent id key and rekey, the purposes file."""
