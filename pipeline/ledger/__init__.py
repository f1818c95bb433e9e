"""The Consent ledger in the work dir: versions, history, staleness, verification against the store."""
