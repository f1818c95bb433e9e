"""A request's life in the work dir: its states and crash contract (state.py), and the audit log."""
