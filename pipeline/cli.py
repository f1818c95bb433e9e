"""``ndop``: one console script, a subcommand per step (request, send, poll, process, run, status).

Each subcommand is a thin wrapper: it parses options, calls the step's module, and turns an
:class:`~pipeline.errors.NdopError` into one line on stderr and its exit status.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from pipeline.errors import EXIT_BAD_INPUT, EXIT_OK, NdopError
from pipeline.state import DEFAULT_WORK_DIR, WorkDir

_LOGGER = logging.getLogger("ndop")

Handler = Callable[[argparse.Namespace], int]


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes, so they can follow the subcommand's name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work-dir", default=os.environ.get("NDOP_WORK_DIR", DEFAULT_WORK_DIR),
                        help="where requests and their state live (env NDOP_WORK_DIR, default %(default)s)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return common


def _request(sub: argparse._SubParsersAction) -> None:
    from pipeline.cohort import DEFAULT_COLUMN, FORMATS
    from pipeline.request import NDOP_MAILBOX

    p = sub.add_parser("request", parents=[common_options()],
                       help="build a validated request (.dat, .ctl, manifest) from a cohort")
    p.add_argument("--cohort", required=True, help="text (one number a line), CSV or Parquet file")
    p.add_argument("--column", default=DEFAULT_COLUMN, help="CSV/Parquet column holding NHS numbers")
    p.add_argument("--format", choices=FORMATS, default="auto", help="cohort format (default: by extension)")
    p.add_argument("--mailbox", default=os.environ.get("MESH_MAILBOX"), help="our MESH mailbox id (env MESH_MAILBOX)")
    p.add_argument("--ndop-mailbox", default=os.environ.get("NDOP_MAILBOX", NDOP_MAILBOX),
                   help="the NDOP (POS) mailbox id (default %(default)s)")
    p.add_argument("--line-ending", choices=("crlf", "lf"), default="crlf")
    p.set_defaults(handler=_run_request)


def _run_request(args: argparse.Namespace) -> int:
    from pipeline.request import RequestSettings, build_request

    settings = RequestSettings(
        mailbox=args.mailbox or "", ndop_mailbox=args.ndop_mailbox, line_ending=args.line_ending,
        column=args.column, format=args.format,
    )
    record = build_request(args.cohort, WorkDir(args.work_dir), settings)
    c = record["counts"]
    print(
        f"request {record['request_id']}: {c['read']} read, {c['invalid']} invalid, {c['duplicates']} duplicates, "
        f"{c['sent']} to send -> {WorkDir(args.work_dir).request_dir(record['request_id'])}"
    )
    return EXIT_OK


def _process(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "process", parents=[common_options()],
        help="join a replied request with its reply and write one FHIR Consent per patient",
        description="Runs the Beam pipeline (pipeline.process) for a replied request. Options this command "
                    "does not know (e.g. --runner, --shards, --batch_size, --upsert) go to the pipeline.",
    )
    p.add_argument("--request-id", required=True, help="the request to process")
    p.add_argument("--fhir-url", default=None, help="FHIR R4 base URL (default: the FHIR client's environment)")
    p.set_defaults(handler=_run_process, beam_args=True)


def _run_process(args: argparse.Namespace) -> int:
    from pipeline.process import process_request

    record = process_request(WorkDir(args.work_dir), args.request_id, args.fhir_url, args.extra_args)
    c = record.get("processing", {}).get("counts", {})
    print(
        f"request {record['request_id']}: {c.get('opted_out', 0)} opted out, {c.get('not_opted_out', 0)} not opted out, "
        f"{c.get('written', 0)} Consents written; state {record['state']}"
    )
    return EXIT_OK


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_request, _process]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ndop", description="Keep FHIR Consent resources in step with the National Data Opt-out."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "beam_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except NdopError as err:
        print(f"ndop {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"ndop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
