"""The process pipeline's options, the same on the ``ndop process`` command line and on Dataflow.

Secrets never appear here: the FHIR token, client secret and Basic password are read from files (or the
environment) by :class:`pipeline.fhir.config.FhirClientConfig`; only their paths are options.
"""
from __future__ import annotations

from typing import Any, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.fhir.config import AUTH_MODES
from pipeline.core.settings import (BATCH, IMPORT_WAIT, PATIENTS, SAMPLE, SHARDS, WHOLE_DAYS, WRITERS,
                                    number_option)

DEFAULT_SHARDS = 32
DEFAULT_BATCH_SIZE = 500


class NdopOptions(PipelineOptions):
    """Where the inputs are, when NDOP answered, and where and how Consents are written."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 (Beam's signature)
        parser.add_argument("--manifest",
                            help="manifest.parquet of the request (column nhs_number); any FileSystems path")
        parser.add_argument("--patient_ids", action="store_true",
                            help="the manifest has a patient_id column: Consents reference Patient/<id>")
        parser.add_argument("--reply", help="the NDOP reply .dat; any FileSystems path")
        parser.add_argument("--checked_at", help="when NDOP answered (ISO 8601 with time zone): Consent.dateTime")
        parser.add_argument("--output_dir",
                            help="folder for dead_letters.jsonl (and summary.json); any FileSystems path")
        parser.add_argument("--request_id", default="", help="the request id, for labels and logs only")
        parser.add_argument("--fhir_url", help="FHIR R4 base URL (default: env FHIR_URL)")
        parser.add_argument("--fhir_auth", choices=AUTH_MODES, help="FHIR auth (default: env FHIR_AUTH, else none)")
        parser.add_argument("--fhir_token_file", help="file holding a bearer token")
        parser.add_argument("--fhir_token_url", help="OAuth2 token endpoint for client credentials")
        parser.add_argument("--fhir_client_id", help="OAuth2 client id")
        parser.add_argument("--fhir_scope", help="OAuth2 scope")
        parser.add_argument("--fhir_client_secret_file", help="file holding the OAuth2 client secret")
        parser.add_argument("--fhir_username", help="HTTP Basic user name (default: env FHIR_USERNAME)")
        parser.add_argument("--fhir_password_file",
                            help="file (0600) holding the HTTP Basic password (default: env FHIR_PASSWORD_FILE, "
                                 "else FHIR_PASSWORD)")
        parser.add_argument("--batch_size", type=number_option("--batch_size", BATCH), default=DEFAULT_BATCH_SIZE,
                            help="Consents per FHIR Bundle")
        parser.add_argument("--max_writers", "--max-writers", dest="max_writers",
                            type=number_option("--max_writers", WRITERS), default=0,
                            help="at most this many bundles in flight to the FHIR store at once, whatever the "
                                 "runner's parallelism (a store's write quota); 0: no cap")
        parser.add_argument("--bundle_type", choices=("batch", "transaction"), default="batch")
        parser.add_argument("--upsert", choices=("id", "conditional"), default="id",
                            help="PUT Consent/<id>, or conditional PUT Consent?identifier=...")
        parser.add_argument("--shards", type=number_option("--shards", SHARDS), default=DEFAULT_SHARDS,
                            help="join shards: NHS numbers are hashed into this many CoGroupByKey keys")
        parser.add_argument("--sample_validate", type=number_option("--sample_validate", SAMPLE), default=1,
                            help="Consents per worker validated with fhir.resources.R4B at run time")
        # Provenance (transforms/provenance.py): one per bundle, naming the NDOP answer that set the Consents.
        parser.add_argument("--provenance_org", "--provenance-org", dest="provenance_org", default=None,
                            help="the exchange's organisation in each Provenance's agent (default: our MESH mailbox)")
        parser.add_argument("--no_provenance", "--no-provenance", dest="no_provenance", action="store_true",
                            default=False, help="write no Provenance beside the Consents")
        parser.add_argument("--id_key_source", default=None,
                            help="where the Consent id key is read, by the launcher and every worker: file:PATH, "
                                 "env:NAME or gcp-secret:projects/P/secrets/S/versions/V (default: env "
                                 "NDOP_ID_KEY_SOURCE, NDOP_ID_KEY_FILE or NDOP_ID_KEY); never the key itself")
        parser.add_argument("--reply_message_id", default="",
                            help="the NDOP reply's MESH message id, named in each Provenance's entity")


class LedgerOptions(PipelineOptions):
    """The Consent ledger (transforms.ledger_join): what the store holds, so a run writes only what changed."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 (Beam's signature)
        parser.add_argument("--ledger_in", default=None,
                            help="folder of the previous ledger (every *.parquet in it); "
                                 "none: a first load, write everybody")
        parser.add_argument("--ledger_out", default=None,
                            help="empty folder for the new ledger (*.parquet); valid only when the run succeeds")
        parser.add_argument("--refresh_days", type=number_option("--refresh_days", WHOLE_DAYS), default=30,
                            help="rewrite an unchanged Consent once per this many days, spread evenly "
                                 "(0: only changes)")
        parser.add_argument("--full_refresh", action="store_true", default=False,
                            help="write every Consent (e.g. after a store restore)")


BULK_STORES = ("hapi", "google")  # the bulk import wired into the run (pipeline/beam/bulk_load.py)
DEFAULT_BULK_MIN_PATIENTS = 100_000
DEFAULT_BULK_TIMEOUT = 24 * 3600


class BulkOptions(PipelineOptions):
    """The bulk first load (pipeline/beam/bulk_load.py): NDJSON and the store's own import in place of PUTs."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 (Beam's signature)
        parser.add_argument("--bulk_import", "--bulk-import", dest="bulk_import", choices=BULK_STORES, default=None,
                            help="on a first load (no ledger, or --full_refresh) of at least --bulk_min_patients, "
                                 "write the Consents and their Provenance as NDJSON and have the store import them "
                                 "(hapi: HAPI's $import, fed from a loopback HTTP server this run starts; google: "
                                 "Cloud Healthcare's import from the gs:// folder the pipeline wrote)")
        parser.add_argument("--bulk_min_patients", "--bulk-min-patients", dest="bulk_min_patients",
                            type=number_option("--bulk_min_patients", PATIENTS), default=DEFAULT_BULK_MIN_PATIENTS,
                            help="the smallest cohort (manifest rows) loaded in bulk; smaller ones are PUT")
        parser.add_argument("--bulk_dir", "--bulk-dir", dest="bulk_dir", default=None,
                            help="folder for the NDJSON files (default: <output_dir>/bulk); removed after the import")
        parser.add_argument("--bulk_serve_host", "--bulk-serve-host", dest="bulk_serve_host", default="127.0.0.1",
                            help="address the files are served on for the store to fetch (hapi); default loopback")
        parser.add_argument("--bulk_timeout", "--bulk-timeout", dest="bulk_timeout",
                            type=number_option("--bulk_timeout", IMPORT_WAIT), default=DEFAULT_BULK_TIMEOUT,
                            help="seconds to wait for the store's import job")


def check_pipeline_args(args: list[str]) -> None:
    """Parse the pipeline's own options out of ``args`` now, so a bad number is one line and exit 2 before anything
    is sent or written (Beam would otherwise find it inside the run)."""
    options = PipelineOptions(args)
    for view in (NdopOptions, LedgerOptions, BulkOptions):
        options.view_as(view)


def fhir_overrides(opts: NdopOptions) -> dict[str, Any]:
    """The :class:`~pipeline.fhir.config.FhirClientConfig` fields the ``--fhir_*`` options set (None: not given, the
    environment's then)."""
    values = {
        "base_url": opts.fhir_url,
        "auth": opts.fhir_auth,
        "token_file": opts.fhir_token_file,
        "token_url": opts.fhir_token_url,
        "client_id": opts.fhir_client_id,
        "scope": opts.fhir_scope,
        "client_secret_file": opts.fhir_client_secret_file,
        "username": opts.fhir_username,
        "password_file": opts.fhir_password_file,
    }
    return {k: v for k, v in values.items() if v is not None}


def id_key_option(args: Sequence[str]) -> str | None:
    """The ``--id_key_source`` among a command's pipeline arguments, as Beam parses it (None: not given)."""
    return NdopOptions(list(args)).id_key_source if args else None
