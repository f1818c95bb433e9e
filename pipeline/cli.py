"""``ndop``: one console script, a subcommand per step (request, send, poll, process, run, status).

Each subcommand is a thin wrapper: it parses options, calls the step's module, and turns an
:class:`~pipeline.core.errors.NdopError` into one line on stderr and its exit status.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

from pipeline.core.errors import EXIT_FAILED, EXIT_OK, EXIT_WAITING, InputError, NdopError, OneLineNdopErrors, printable
from pipeline.core.files import check_folder
from pipeline.orchestration.plausibility import SWING
from pipeline.core.settings import DAYS, POLL_INTERVAL, SAMPLE, WAIT, WHOLE_DAYS, number_option
from pipeline.lifecycle.state import DEFAULT_WORK_DIR, WorkDir, check_request_id

_LOGGER = logging.getLogger("ndop")

Handler = Callable[[argparse.Namespace], int]
VERIFY_SAMPLE = 100  # Consents `ndop run` reads back each run (pipeline/ledger/verify.py)


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes, so they can follow the subcommand's name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work-dir", default=os.environ.get("NDOP_WORK_DIR", DEFAULT_WORK_DIR),
                        help="where requests and their state live (env NDOP_WORK_DIR, default %(default)s)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="every log line, down to debug (default: progress, warnings and errors)")
    common.add_argument("--wait-lock", action="store_true",
                        help="if another ndop command is working in the work dir, wait for it "
                             "(default: exit 4 at once)")
    common.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="log lines as text or one JSON object a line (env NDOP_LOG_FORMAT, default text)")
    return common


def _request(sub: argparse._SubParsersAction) -> None:
    from pipeline.request.cohort import DEFAULT_COLUMN, FORMATS
    from pipeline.request.build import NDOP_MAILBOX

    p = sub.add_parser("request", parents=[common_options()],
                       help="build a validated request (.dat, .ctl, manifest) from a cohort")
    p.add_argument("--cohort", required=True, help="text (one number a line), CSV or Parquet file")
    p.add_argument("--column", default=DEFAULT_COLUMN, help="CSV/Parquet column holding NHS numbers")
    p.add_argument("--patient-id-column", default=None, metavar="COLUMN",
                   help="CSV/Parquet column holding each row's FHIR Patient id: its Consent then references "
                        "Patient/<id> beside the NHS number (--cohort fhir does this by itself)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="cohort format (default: by extension)")
    p.add_argument("--mailbox", default=os.environ.get("MESH_MAILBOX"), help="our MESH mailbox id (env MESH_MAILBOX)")
    p.add_argument("--ndop-mailbox", default=os.environ.get("NDOP_MAILBOX", NDOP_MAILBOX),
                   help="the NDOP (POS) mailbox id (default %(default)s)")
    p.add_argument("--line-ending", choices=("crlf", "lf"), default="crlf",
                   help="line ending of the .dat sent to NDOP (default %(default)s; some services want lf)")
    p.set_defaults(handler=_run_request)


def _run_request(args: argparse.Namespace) -> int:
    from pipeline.request.build import RequestSettings, build_request

    settings = RequestSettings(
        mailbox=args.mailbox or "", ndop_mailbox=args.ndop_mailbox, line_ending=args.line_ending,
        column=args.column, format=args.format, patient_id_column=args.patient_id_column,
    )
    record = build_request(args.cohort, WorkDir(args.work_dir), settings)
    c = record["counts"]
    print(
        f"request {record['request_id']}: {c['read']} read, {c['invalid']} invalid, {c['duplicates']} duplicates, "
        f"{c['sent']} to send -> {WorkDir(args.work_dir).request_dir(record['request_id'])}"
    )
    return EXIT_OK


def _fhir_url_option(p: argparse.ArgumentParser, what: str = "FHIR R4 base URL", *, session: bool = True) -> None:
    """``--fhir-url``, the same on every command that talks to (or checks against) the FHIR store; ``session``: the
    command talks to it, so also ``--fhir-username`` (HTTP Basic; its password only from a file or the
    environment)."""
    p.add_argument("--fhir-url", default=None, help=f"{what} (default: env FHIR_URL)")
    if session:
        p.add_argument("--fhir-username", default=None, metavar="NAME",
                       help="HTTP Basic user name for FHIR_AUTH=basic (default: env FHIR_USERNAME); the password "
                            "only from FHIR_PASSWORD_FILE (0600) or FHIR_PASSWORD")


def _fhir_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The FHIR client settings given as options of an ``ndop`` command (the environment gives the rest)."""
    return {"username": args.fhir_username} if args.fhir_username else {}


def _fhir_pipeline_args(args: argparse.Namespace) -> list[str]:
    """The same, as the process pipeline's options (after the command's own: they win)."""
    return [f"--fhir_username={args.fhir_username}"] if args.fhir_username else []


def _check_fhir_auth(args: argparse.Namespace) -> None:
    """The FHIR auth settings (option, pipeline option or environment), before anything is built, sent or written:
    a basic without a user name or password source, or over plain http to another machine, is one line, exit 2.
    Only when a FHIR URL is set (a command that never reaches the store needs none)."""
    from pipeline.fhir.config import ENV_URL, FhirClientConfig

    overrides: dict[str, Any] = {}
    if args.extra_args:  # ndop process/run: --fhir_* options for the pipeline
        from pipeline.beam.options import NdopOptions, fhir_overrides

        overrides = fhir_overrides(NdopOptions(list(args.extra_args)))
    overrides.update({k: v for k, v in (("base_url", args.fhir_url), *_fhir_overrides(args).items()) if v})
    if overrides.get("base_url") or os.environ.get(ENV_URL):
        FhirClientConfig.from_env(**overrides)


def _stage_dir_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--stage-dir`` (env NDOP_STAGE_DIR): where a remote runner's copies of a request live."""
    p.add_argument("--stage-dir", default=os.environ.get("NDOP_STAGE_DIR"), metavar="URL",
                   help=f"{what} (env NDOP_STAGE_DIR)")


def _mesh_options() -> argparse.ArgumentParser:
    """MESH connection options shared by send and poll (secrets only from env or the config file)."""
    mesh = argparse.ArgumentParser(add_help=False)
    mesh.add_argument("--mesh-config", metavar="FILE", default=None,
                      help="KEY=value file of MESH settings (env MESH_CONFIG); overrides the environment")
    mesh.add_argument("--mesh-url", default=None,
                      help="MESH URL, or int / live for mesh-client's built-in endpoints (env MESH_URL)")
    return mesh


def _mesh_driver(args: argparse.Namespace, **overrides: str | None):
    from pipeline.mesh.config import load_config
    from pipeline.mesh.driver import MeshDriver

    config = load_config(args.mesh_config, overrides={"MESH_URL": args.mesh_url, **overrides})
    return MeshDriver(config, WorkDir(args.work_dir))


def _poll_timing(p: argparse.ArgumentParser, wait_help: str) -> None:
    """--wait and --interval, shared by poll and run (the MESH API's polling rule: pipeline/mesh/config.py)."""
    from pipeline.mesh.config import MIN_POLL_INTERVAL

    p.add_argument("--wait", type=number_option("--wait", WAIT), default=0, metavar="SECONDS", help=wait_help)
    p.add_argument("--interval", type=number_option("--interval", POLL_INTERVAL), default=MIN_POLL_INTERVAL,
                   metavar="SECONDS",
                   help="between polls (default %(default)s; the MESH API allows no less than 300 against a real "
                        "MESH, a loopback sandbox may go faster)")


def _send(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("send", parents=[common_options(), _mesh_options()],
                       help="upload created requests to NDOP through MESH")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--request-id", help="send this request only")
    which.add_argument("--all", action="store_true", help="send every request due (the default)")
    p.add_argument("--send-ctl", action="store_true", default=None,
                   help="also send the .ctl as its own MESH message (env NDOP_SEND_CTL; off by default)")
    p.set_defaults(handler=_run_send)


def _run_send(args: argparse.Namespace) -> int:
    if args.request_id is not None:
        check_request_id(args.request_id)
    with _mesh_driver(args, NDOP_SEND_CTL="1" if args.send_ctl else None) as driver:
        results = driver.send(request_id=args.request_id)
    if not results:
        print("nothing to send")
    for result in results:
        print(f"request {result.request_id}: {result.outcome}: {result.detail}")
    problems = [r for r in results if r.is_problem]
    for result in problems:
        print(f"ndop send: error: request {result.request_id}: {result.detail}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def _poll(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("poll", parents=[common_options(), _mesh_options()],
                       help="download NDOP's notices and replies from the MESH inbox")
    _poll_timing(p, "keep polling until no request is in flight, or this long (exit 3 if time runs out)")
    p.set_defaults(handler=_run_poll)


def _run_poll(args: argparse.Namespace) -> int:
    with _mesh_driver(args) as driver:
        driver.config.check_poll_interval(args.interval)
        report = driver.poll(wait=args.wait, interval=args.interval)
    print(
        f"inbox: {report.listed} NDOP message(s); {len(report.notices)} notice(s), {len(report.replies)} reply(ies), "
        f"{len(report.rejected)} rejected, {len(report.failed)} failed, {len(report.duplicates)} duplicate(s) "
        f"acknowledged, {len(report.unknown_local_id)} with no matching request left alone, "
        f"{report.other_workflow} of other workflows left alone, {len(report.unreadable)} unreadable skipped"
    )
    for rid in report.replies:
        print(f"request {rid}: reply downloaded; run `ndop process`")
    for rid in sorted(report.awaiting_processing):
        print(f"request {rid}: reply waiting for `ndop process`")
    for rid, reason in report.rejected:
        print(f"ndop poll: error: request {rid} rejected by NDOP: {reason}", file=sys.stderr)
    for rid, reason in report.failed:
        print(f"ndop poll: error: request {rid} failed: {reason}", file=sys.stderr)
    if report.problems:
        return EXIT_FAILED
    if report.timed_out:
        print(f"ndop poll: still waiting for NDOP: {', '.join(report.in_flight)}", file=sys.stderr)
        return EXIT_WAITING
    return EXIT_OK


def _resolve_reply(sub: argparse._SubParsersAction) -> None:
    from pipeline.lifecycle.state import REPLY_CHOICES

    p = sub.add_parser("resolve-reply", parents=[common_options(), _mesh_options()],
                       help="say which of two different replies to a request is NDOP's (only for a request stopped "
                            "by a second reply); the other is acknowledged in MESH unused, and the decision audited")
    p.add_argument("--request-id", required=True, help="the request stopped by a second, different reply")
    p.add_argument("--use", required=True, choices=REPLY_CHOICES,
                   help="first: the reply already saved (reply.dat); second: the reply left in the MESH inbox")
    p.add_argument("--message-id", default=None, help="with --use second: which second reply, when more than one")
    p.set_defaults(handler=_run_resolve_reply)


def _run_resolve_reply(args: argparse.Namespace) -> int:
    from pipeline.lifecycle.state import decide_second_reply

    decide_second_reply(WorkDir(args.work_dir).load(check_request_id(args.request_id)), args.use, args.message_id)
    with _mesh_driver(args) as driver:  # bad input is refused above, before MESH is asked anything
        record, decision = driver.resolve_second_reply(args.request_id, args.use, args.message_id)
    aside = ", ".join(a["message_id"] for a in decision.set_aside if a.get("message_id"))
    print(f"request {record['request_id']}: the {decision.use} reply (MESH message {decision.keep['message_id']}) "
          f"is NDOP's answer; acknowledged unused: {aside}; `ndop process` or `ndop run` carries it on")
    return EXIT_OK


def _status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", parents=[common_options()], help="one line per request: state, counts, ages")
    p.add_argument("--overdue-days", type=number_option("--overdue-days", DAYS), default=None, metavar="N",
                   help="flag requests with no reply after this many days (env NDOP_OVERDUE_DAYS, default 5)")
    p.add_argument("--stale-days", type=number_option("--stale-days", DAYS), default=None, metavar="N",
                   help="count patients last confirmed by NDOP more than N days ago as stale "
                        "(env NDOP_STALE_DAYS, default 21)")
    p.add_argument("--json", action="store_true", help="one JSON document (requests and the ledger) for monitoring")
    p.set_defaults(handler=_run_status, read_only=True)


def _run_status(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from pipeline.mesh.config import load_config
    from pipeline.ops.status import format_status, status_rows

    from pipeline.ledger.staleness import format_summary, ledger_summary, stale_days

    overdue = (timedelta(days=args.overdue_days) if args.overdue_days is not None
               else load_config(validate=False).overdue_after)
    work_dir = WorkDir(args.work_dir)
    records, damaged = work_dir.readable()  # a damaged request.json is named and skipped; exit 1
    rows = status_rows(work_dir, overdue, records=records)
    summary = ledger_summary(work_dir, stale_days(args.stale_days))
    code = EXIT_FAILED if damaged else EXIT_OK
    for err in damaged:
        print(f"ndop status: error: skipped {printable(str(err))}", file=sys.stderr)
    if args.json:
        from pipeline.ops.status import status_document

        print(json.dumps(status_document(rows, summary, [str(e) for e in damaged]), indent=2, sort_keys=True))
        return code
    for line in format_status(rows, work_dir.root):
        print(line)
    from pipeline.ledger.versions import status_line

    ledger = status_line(work_dir)
    if ledger:
        print(ledger)
    for line in format_summary(summary) if summary else ():
        print(line)
    return code


def _ledger_options() -> argparse.ArgumentParser:
    """The Consent ledger's options, shared by process and run (pipeline.ledger.versions passes them on)."""
    ledger = argparse.ArgumentParser(add_help=False)
    ledger.add_argument("--refresh-days", type=number_option("--refresh-days", WHOLE_DAYS), default=None, metavar="N",
                        help="rewrite an unchanged Consent once per N days, spread evenly over the cohort "
                             "(env NDOP_REFRESH_DAYS, default 30; 0: write only changes)")
    ledger.add_argument("--full-refresh", action="store_true",
                        help="write every Consent (e.g. after a store restore) and start a new ledger")
    ledger.add_argument("--max-swing", type=number_option("--max-swing", SWING), default=None, metavar="POINTS",
                        help="refuse a reply that moves the opted-out share more than this many percentage points "
                             "against the ledger (env NDOP_MAX_SWING, default 2)")
    ledger.add_argument("--accept-swing", action="store_true",
                        help="a person has checked NDOP's answer: use it even if it moves the share more")
    return ledger


def _swing(args: argparse.Namespace) -> float | None:
    from pipeline.orchestration.plausibility import max_swing

    return None if args.accept_swing else max_swing(args.max_swing)


def _ledger_args(args: argparse.Namespace) -> list[str]:
    from pipeline.ledger.versions import cli_args

    return cli_args(args.refresh_days, args.full_refresh)


def _process(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "process", parents=[common_options(), _mesh_options(), _ledger_options()],
        help="join a replied request with its reply and write one FHIR Consent per patient",
        description="Runs the Beam pipeline (pipeline.beam.graph) for a replied request. Options this command "
                    "does not know (e.g. --runner, --shards, --batch_size, --upsert) go to the pipeline.",
    )
    p.add_argument("--request-id", required=True, help="the request to process")
    _fhir_url_option(p)
    _stage_dir_option(p, "copy the request's inputs to URL/<request id>/ and run there (e.g. gs://bucket/ndop, "
                         "for --runner DataflowRunner)")
    p.add_argument("--no-ack", action="store_true",
                   help="write the Consents but leave the MESH reply unacknowledged (no MESH settings needed); "
                        "a later `ndop process` or `ndop poll` acknowledges it")
    p.set_defaults(handler=_run_process, beam_args=True, precheck=_check_key)


def _run_process(args: argparse.Namespace) -> int:
    from pipeline.orchestration.process_request import process_request

    check_request_id(args.request_id)

    args.extra_args = [*args.extra_args, *_ledger_args(args), *_fhir_pipeline_args(args)]
    if args.no_ack:
        record = process_request(WorkDir(args.work_dir), args.request_id, args.fhir_url, args.extra_args,
                                 stage_dir=args.stage_dir, swing=_swing(args))
    else:
        with _mesh_driver(args) as driver:  # configuration errors surface before the pipeline runs
            record = process_request(WorkDir(args.work_dir), args.request_id, args.fhir_url, args.extra_args,
                                     acknowledge=driver.acknowledge, stage_dir=args.stage_dir, swing=_swing(args))
    c = record.get("processing", {}).get("counts", {})
    print(
        f"request {record['request_id']}: {c.get('opted_out', 0)} opted out, "
        f"{c.get('not_opted_out', 0)} not opted out, "
        f"{c.get('written', 0)} Consents written; state {record['state']}"
    )
    return EXIT_OK


def _run(sub: argparse._SubParsersAction) -> None:
    from pipeline.request.cohort import DEFAULT_COLUMN, FORMATS

    p = sub.add_parser(
        "run", parents=[common_options(), _mesh_options(), _ledger_options()],
        help="request -> send -> poll -> process -> acknowledge, resumable; prints the run report",
        description="One scheduled run. Carries on an unfinished request before building a new one. Exit 0 "
                    "done, 3 still waiting for NDOP, 1 failed, 2 bad input or configuration, 4 another ndop command "
                    "holds the work dir. Options this command does not know (e.g. --runner, --batch_size) go to "
                    "the Beam pipeline.",
    )
    p.add_argument("--cohort", help="cohort file (text, CSV, Parquet), or 'fhir' to read every Patient's NHS "
                                    "number from the FHIR store")
    p.add_argument("--column", default=DEFAULT_COLUMN, help="CSV/Parquet column holding NHS numbers")
    p.add_argument("--patient-id-column", default=None, metavar="COLUMN",
                   help="CSV/Parquet column holding each row's FHIR Patient id: its Consent then references "
                        "Patient/<id> beside the NHS number (--cohort fhir does this by itself)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="cohort format (default: by extension)")
    p.add_argument("--line-ending", choices=("crlf", "lf"), default="crlf",
                   help="line ending of the .dat sent to NDOP (default %(default)s; some services want lf)")
    _poll_timing(p, "how long to wait for NDOP's reply in this run (default 0: check once; exit 3 if none)")
    p.add_argument("--new-request", action="store_true",
                   help="build and send a new request even if an earlier one is unfinished")
    _fhir_url_option(p)
    _stage_dir_option(p, "run the process step on inputs copied here (e.g. gs://bucket/ndop for Dataflow)")
    p.add_argument("--verify-sample", type=number_option("--verify-sample", SAMPLE), default=VERIFY_SAMPLE,
                   metavar="N", help="after the run, read N Consents picked at random back from the store and "
                                     "compare them with the ledger (default %(default)s; 0: none; ndop verify "
                                     "checks them all)")
    p.add_argument("--metrics-file", default=None, metavar="PATH",
                   help="after the run, write Prometheus metrics here for node_exporter's textfile collector "
                        "(env NDOP_METRICS_FILE)")
    p.set_defaults(handler=_run_run, beam_args=True, precheck=_check_run_settings)


def _check_run_settings(args: argparse.Namespace) -> None:
    """Every number ``ndop run`` reads from the environment, checked before anything is built or sent."""
    from pipeline.mesh.config import load_config
    from pipeline.beam.progress import every_seconds
    from pipeline.privacy.purge import grace_days, retention_days
    from pipeline.ledger.staleness import stale_days

    retention_days(None), stale_days(), every_seconds(), _ledger_args(args), _swing(args), grace_days()
    _check_key(args)
    load_config(args.mesh_config, overrides={"MESH_URL": args.mesh_url}).check_poll_interval(args.interval)


def _check_key(args: argparse.Namespace) -> None:
    """The Consent id key (pipeline/privacy/keys.py), before a request is sent or a Consent written."""
    from pipeline.fhir.config import ENV_URL
    from pipeline.privacy.keys import open_key, resolve_key_source

    option = None
    if args.extra_args:  # ndop process/run: a --id_key_source for the pipeline
        from pipeline.beam.options import id_key_option

        option = id_key_option(args.extra_args)
    url = args.fhir_url or os.environ.get(ENV_URL)
    spec = resolve_key_source(option, WorkDir(args.work_dir).root, url, create=False)
    if spec is not None:  # None: the work dir's own key, made when the command writes
        open_key(spec)


def _run_run(args: argparse.Namespace) -> int:
    from pipeline.mesh.config import load_config
    from pipeline.request.build import RequestSettings
    from pipeline.orchestration.run import RunSettings, print_report, run

    mesh = load_config(args.mesh_config, overrides={"MESH_URL": args.mesh_url})
    settings = RunSettings(
        cohort=args.cohort,
        request=RequestSettings(mailbox=mesh.mailbox, ndop_mailbox=mesh.ndop_mailbox, line_ending=args.line_ending,
                                column=args.column, format=args.format,
                                patient_id_column=args.patient_id_column),
        wait=args.wait, interval=args.interval, new_request=args.new_request, fhir_url=args.fhir_url,
        beam_args=[*args.extra_args, *_ledger_args(args), *_fhir_pipeline_args(args)], stage_dir=args.stage_dir,
        swing=_swing(args), verify_sample=args.verify_sample, fhir_env_overrides=_fhir_overrides(args),
    )
    from pipeline.ops.metrics import metrics_file
    from pipeline.privacy.purge import retention_days
    from pipeline.ops.outputs import recorded

    work_dir = WorkDir(args.work_dir)
    retention = retention_days(None)
    with recorded(work_dir, metrics_file(args.metrics_file)) as outcome:  # runs.jsonl, HTML pages, metrics
        result = run(work_dir, mesh, settings)
        outcome.exit_code, outcome.request_id, outcome.message, outcome.report = (
            result.exit_code, result.request_id, result.message, result.report)
    print_report(result, work_dir)
    print(f"pages: {work_dir.root / 'index.html'}")
    if retention is not None:
        _purge_after_run(work_dir, retention, args.stage_dir)
    return result.exit_code


def _report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", parents=[common_options()],
                       help="regenerate report.md/.json/.html of a request (default: every request) and index.html")
    p.add_argument("--request-id", help="this request only (index.html is always regenerated)")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from pipeline.ops.report import write_report
    from pipeline.ops.report_html import write_index, write_request_page

    work_dir = WorkDir(args.work_dir)
    records = [work_dir.load(args.request_id)] if args.request_id else work_dir.all()
    for record in records:
        write_request_page(work_dir, record["request_id"], write_report(work_dir, record))
        print(f"report: {work_dir.request_dir(record['request_id']) / 'report.html'}")
    print(f"index: {write_index(work_dir)}")
    return EXIT_OK


def _purge_after_run(work_dir: WorkDir, days: float, stage_dir: str | None) -> None:
    """``ndop run`` purges finished requests at its end when NDOP_RETENTION_DAYS is set (pipeline/privacy/purge.py)."""
    from pipeline.privacy.purge import format_purge, purge, purge_leftovers

    items, leftovers = purge(work_dir, days, stage_dir=stage_dir), purge_leftovers(work_dir, days)
    for line in format_purge(items, dry_run=False, leftovers=leftovers) if items or leftovers else ():
        print(f"[purge] {line}", file=sys.stderr)


def _purge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("purge", parents=[common_options()],
                       help="delete the files holding NHS numbers of finished requests past the retention period",
                       description="Keeps request.json, report.* and summary.json (and a .ctl without numbers). "
                                   "Also removes leftovers, each by its own age rule: .building-* of a killed "
                                   "request, ledger .pending-* never swapped in, requests with no answer past the "
                                   "MESH expiry + NDOP_UNFINISHED_GRACE_DAYS (default 5), and ledger rows of "
                                   "patients who left the cohort more than DAYS ago (pipeline/privacy/purge.py).")
    p.add_argument("--older-than", type=number_option("--older-than", DAYS), default=None, metavar="DAYS",
                   help="purge requests finished, and patients who left the cohort, more than DAYS ago "
                        "(env NDOP_RETENTION_DAYS, default 30; 0: every finished request)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    _stage_dir_option(p, "also delete the requests' staged copies under URL/<request id>/")
    p.set_defaults(handler=_run_purge, precheck=_check_purge_settings)


def _check_purge_settings(args: argparse.Namespace) -> None:
    from pipeline.privacy.purge import grace_days, retention_days

    retention_days(args.older_than), grace_days()


def _run_purge(args: argparse.Namespace) -> int:
    from pipeline.privacy.purge import DEFAULT_RETENTION_DAYS, format_purge, purge, purge_leftovers, retention_days

    days = retention_days(args.older_than)
    days = DEFAULT_RETENTION_DAYS if days is None else days
    items = purge(WorkDir(args.work_dir), days, dry_run=args.dry_run, stage_dir=args.stage_dir)
    leftovers = purge_leftovers(WorkDir(args.work_dir), days, dry_run=args.dry_run)
    for line in format_purge(items, args.dry_run, leftovers):
        print(line)
    return EXIT_OK


def _verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", parents=[common_options()],
                       help="read Consents back from the FHIR store and compare them with the ledger",
                       description="Compares id, status and dateTime of every Consent in the ledger (or a random "
                                   "sample) with the store's. A mismatch is written again now with --repair, else "
                                   "queued: the next process step writes it. Exit 1 while a mismatch is not repaired "
                                   "(pipeline/ledger/verify.py).")
    p.add_argument("--sample", type=number_option("--sample", SAMPLE), default=None, metavar="N",
                   help="check N patients picked at random (default: every one)")
    p.add_argument("--repair", action="store_true", help="write the mismatched Consents again now")
    _fhir_url_option(p)
    p.set_defaults(handler=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from pipeline.fhir.config import FhirClientConfig
    from pipeline.ledger.verify import verify

    result = verify(WorkDir(args.work_dir), FhirClientConfig.from_env(base_url=args.fhir_url, **_fhir_overrides(args)),
                    sample=args.sample, repair=args.repair)
    c = result.counts()
    print(f"verified {c['checked']} Consents: {c['mismatches']} differ from the ledger ({c['missing']} missing, "
          f"{c['status']} status, {c['dateTime']} dateTime); {c['repaired']} repaired, {c['queued']} queued for "
          f"the next process step")
    if c["mismatches"] > c["repaired"]:
        print(f"ndop verify: error: {c['mismatches'] - c['repaired']} Consents differ from the ledger; queued for "
              "rewrite (or run ndop verify --repair)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", parents=[common_options()], help="make a new Consent id key (a 0600 file)",
                       description="Consent ids are derived from NHS numbers with this secret key, so an id in a log "
                                   "does not give the number away (docs/privacy.md). Keep the file safe and private; "
                                   "point NDOP_ID_KEY_FILE at it. An existing file is never overwritten.")
    p.add_argument("--out", required=True, metavar="FILE", help="the new key file")
    p.set_defaults(handler=_run_keygen, read_only=True)


def _run_keygen(args: argparse.Namespace) -> int:
    from pipeline.privacy.keys import keygen

    key = keygen(args.out)
    print(f"Consent id key written to {args.out} (0600), fingerprint {key.fingerprint}; "
          f"now: export NDOP_ID_KEY_FILE={os.path.abspath(args.out)}")
    return EXIT_OK


def _rekey(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rekey", parents=[common_options()],
                       help="move the store's Consents to the current key's ids (once, resumable)",
                       description="Writes each Consent the ledger names under the id of the current Consent id key "
                                   "(NDOP_ID_KEY_FILE) and deletes its old id, rewrites Provenance targets, then "
                                   "records the key's fingerprint in the ledger. Safe to run again after a failure "
                                   "(pipeline/privacy/rekey.py).")
    _fhir_url_option(p)
    p.set_defaults(handler=_run_rekey, precheck=_check_key)


def _run_rekey(args: argparse.Namespace) -> int:
    from pipeline.fhir.config import FhirClientConfig
    from pipeline.privacy.keys import open_key, resolve_key_source
    from pipeline.privacy.rekey import rekey

    config = FhirClientConfig.from_env(base_url=args.fhir_url, **_fhir_overrides(args))
    work_dir = WorkDir(args.work_dir)
    key, _ = open_key(resolve_key_source(None, work_dir.root, config.base_url, create=True))
    result = rekey(work_dir, config, key)
    c = result.counts()
    print(f"rekey to key {key.fingerprint}: {c['patients']} patients; {c['moved']} moved, {c['already']} already "
          f"under the new ids, {c['restored']} restored from the ledger; {c['provenances']} Provenances retargeted")
    return EXIT_OK


def _filter(sub: argparse._SubParsersAction) -> None:
    """``ndop filter`` (issue 23): apply the opt-outs to a CSV/Parquet file (pipeline/beam/filtering.py)."""
    p = sub.add_parser(
        "filter", parents=[common_options()],
        help="write a CSV/Parquet file without the patients who opted out (or list who opted out since a date)",
        description="Applies the Consent ledger to a file for a disclosure beyond individual care: writes the kept "
                    "rows, a manifest (OUTPUT.manifest.json) and one audit line. Options this command does not "
                    "know (e.g. --runner) go to the Beam pipeline.")
    p.add_argument("--input", help="CSV or Parquet file (any FileSystems path)")
    p.add_argument("--output", required=True, help="the filtered file (with --removed-since: the numbers, 0600)")
    p.add_argument("--column", default="nhs_number", help="the column holding NHS numbers (default %(default)s)")
    p.add_argument("--format", choices=("auto", "csv", "parquet"), default="auto", help="default: by extension")
    p.add_argument("--purpose", default=None, metavar="NAME",
                   help="the purpose in the purposes file (default: none, opt-outs apply)")
    p.add_argument("--purposes", default=None, metavar="FILE", help="the purposes file (env NDOP_PURPOSES_FILE)")
    p.add_argument("--as-of", default=None, metavar="DATE", help="apply the statuses held at this date (UTC)")
    p.add_argument("--removed-since", default=None, metavar="DATE",
                   help="instead: list the patients who opted out since DATE (a past disclosure)")
    p.add_argument("--unknown", choices=("drop", "keep"), default="drop",
                   help="a number the ledger never checked, or checked too long ago (default: drop)")
    p.add_argument("--max-age", type=number_option("--max-age", DAYS), default=None, metavar="DAYS",
                   help="refuse a ledger (and drop a status) last checked by NDOP longer ago (default: "
                        "NDOP_STALE_DAYS, 21)")
    p.add_argument("--ledger", default=None, metavar="DIR", help="a ledger folder (default: the work dir's)")
    _fhir_url_option(p, "refuse a ledger of another FHIR store than this", session=False)
    p.set_defaults(handler=_run_filter, beam_args=True)


def _run_filter(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from pipeline.beam import filtering
    from pipeline.privacy import purposes
    from pipeline.ledger.staleness import stale_days

    work_dir = WorkDir(args.work_dir)
    if args.removed_since:
        since = filtering.parse_moment(args.removed_since, "--removed-since", end_of_day=False)
        found = filtering.removed_since(work_dir, since, args.output, ledger=args.ledger)
        print(f"ndop filter: {found} patients opted out since {args.removed_since}: {args.output}")
        return EXIT_OK
    if not args.input:
        raise InputError("give --input (or --removed-since)")
    purpose = purposes.choose(args.purpose, args.purposes, datetime.now(timezone.utc).date())
    as_of = filtering.parse_moment(args.as_of, "--as-of", end_of_day=True) if args.as_of else None
    if as_of and as_of.date() > datetime.now(timezone.utc).date():
        raise InputError(f"--as-of {args.as_of} is in the future: the ledger knows only what NDOP has said")
    settings = filtering.FilterSettings(
        input=args.input, output=args.output, column=args.column, fmt=args.format, unknown=args.unknown,
        max_age_days=stale_days(args.max_age), fhir_base_url=args.fhir_url or os.environ.get("FHIR_URL"),
        exempt=bool(purpose and purpose.keep_opted_out),
        as_of=as_of)
    m = filtering.run_filter(work_dir, settings, ledger=args.ledger, beam_args=args.extra_args,
                             purpose=purpose.record() if purpose else None)
    print(f"ndop filter: {m['rows_in']} rows in, {m['kept']} kept, {m['removed_opted_out']} removed as opted out, "
          f"{m['removed_unknown']} as unknown or stale, {m['removed_invalid']} as invalid: {args.output}")
    return EXIT_OK


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _request, _send, _poll, _resolve_reply, _process, _run, _status, _report, _purge, _verify, _filter, _keygen, _rekey,
]


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
    try:  # a number out of its range is one line and exit 2 (pipeline/core/settings.py), before anything runs
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "beam_args", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:
            from pipeline.beam.options import check_pipeline_args

            check_pipeline_args(extra)
    except NdopError as err:
        print(f"ndop: error: {printable(str(err))}", file=sys.stderr)
        return err.exit_code
    args.extra_args = extra
    from pipeline.core import logs

    logs.configure(args.log_format or logs.default_format(), verbose=args.verbose)
    if not args.verbose:
        logging.getLogger("apache_beam.runners.common").addFilter(OneLineNdopErrors())
    code = EXIT_FAILED
    made_here = not os.path.lexists(args.work_dir)
    try:
        check_folder(args.work_dir, "work dir")  # e.g. under /proc or through a file: one line, before any step
        if hasattr(args, "fhir_url"):  # no user:password@ in a FHIR URL (issue 21), before anything runs
            from pipeline.fhir.config import check_cli_url

            check_cli_url(args.fhir_url)
            if hasattr(args, "fhir_username"):
                _check_fhir_auth(args)
        if getattr(args, "precheck", None):
            args.precheck(args)  # settings read from the environment: bad input before the work dir is touched
        if getattr(args, "read_only", False):
            code = args.handler(args)
        else:
            # one command at a time (pipeline/lifecycle/state.py)
            with WorkDir(args.work_dir).lock(wait=args.wait_lock):
                code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not after main
        return code
    except NdopError as err:
        print(f"ndop {args.command}: error: {printable(str(err))}", file=sys.stderr)
        code = err.exit_code
        return code
    except BrokenPipeError:  # the reader went away (``ndop status | head``): stop quietly, as a pipe expects
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe
        return code
    except OSError as err:  # the system refused something unforeseen: one line; -v shows where
        if args.verbose:
            raise
        from pipeline.core.nhs import redact

        print(f"ndop {args.command}: error: {printable(redact(str(err)))} (-v shows where)", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"ndop {args.command}: interrupted", file=sys.stderr)
        code = 130
        return code
    finally:
        if not (made_here and code != EXIT_OK and WorkDir(args.work_dir).discard_if_unused()):
            _audit_command(args, code)


def _audit_command(args: argparse.Namespace, code: int) -> None:
    """One ``audit.jsonl`` line per command run (pipeline/lifecycle/audit.py); never fails the command."""
    from pipeline.lifecycle import audit

    try:
        audit.command_event(args.work_dir, args.command, code, fhir_url=getattr(args, "fhir_url", None),
                            request_id=getattr(args, "request_id", None))
    except OSError as err:
        print(f"ndop {args.command}: warning: audit log not written: {err.strerror or err}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
