"""The FHIR client: settings (config.py), answers and errors (answers.py), retries (retry.py), authenticated
sessions (sessions.py), search and bundles (search.py); a first load in bulk (bulk_import.py)."""
