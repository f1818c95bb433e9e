"""The process pipeline is portable to Dataflow: it builds for ``DataflowRunner`` without touching its
inputs, every DoFn and CombineFn pickles and holds no secret, the package Dataflow stages from
``--setup_file`` is just ``pipeline`` + ``transforms``, and all pipeline I/O goes through ``FileSystems``.

Nothing is submitted: ``--dry_run=True`` (Beam's ``TestOptions``) makes ``DataflowRunner`` translate
the graph, stage the package and build the job request, then stop before calling the Dataflow API.
"""
from __future__ import annotations

import base64
import bz2
import json
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.internal import pickler
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.testing.util import assert_that, equal_to

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.beam.options import NdopOptions
from tests.helpers import REPO_ROOT
from pipeline.beam.graph import build_pipeline, check_inputs
from pipeline.orchestration.process_request import process_request
from pipeline.lifecycle.state import PROCESSED
from tests.beam_util import RUNNER_ARGS
from tests.test_process_pipeline import _consents_of, _replied_request
from tests.helpers import consent_id

SENTINEL = "sentinel-secret-4f1d9c"  # stands for the FHIR token / client secret
BUCKET = "gs://ndop-test-bucket"
CHECKED_AT = "2024-11-26T10:15:00Z"
HEALTHCARE_URL = "https://healthcare.googleapis.com/v1/projects/P/locations/europe-west2/datasets/D/fhirStores/S/fhir"
OUR_FNS = {"ShardManifestFn", "ParseReplyFn", "DecideShardFn", "ReadLedgerFileFn", "BuildConsentFn", "_PostBundlesFn", "ToJsonLineFn"}
STAGES = {"ReadManifest", "ReadReply", "ReadLedger", "JoinWithLedger", "BuildConsent", "WriteConsents", "WriteDeadLetters"}


def dataflow_args(setup_file: Path = REPO_ROOT / "setup.py") -> list[str]:
    return [
        "--runner=DataflowRunner", "--project=ndop-test-project", "--region=europe-west2",
        f"--temp_location={BUCKET}/tmp", f"--setup_file={setup_file}", "--dry_run=True",
    ]


def ndop_args(folder: str, auth: str = "google", token_file: str | None = None) -> list[str]:
    args = [
        f"--manifest={folder}/manifest.parquet", f"--reply={folder}/reply.dat", f"--checked_at={CHECKED_AT}",
        f"--output_dir={folder}", f"--fhir_url={HEALTHCARE_URL}", f"--fhir_auth={auth}", "--provenance_org=X26ABC1",
    ]
    if auth == "client-credentials":
        args += ["--fhir_token_url=https://auth.example/token", "--fhir_client_id=ndop-sync"]
    if token_file:
        args.append(f"--fhir_token_file={token_file}")
    return args


@pytest.fixture
def secrets_in_env(monkeypatch, tmp_path) -> Path:
    """The secrets where the FHIR client would find them at run time; returns a token file holding one."""
    monkeypatch.setenv("FHIR_TOKEN", SENTINEL)
    monkeypatch.setenv("FHIR_CLIENT_SECRET", SENTINEL)
    token_file = tmp_path / "fhir-token"
    token_file.write_text(SENTINEL + "\n")
    return token_file


@pytest.fixture
def no_filesystem_access(monkeypatch) -> None:
    """Building the graph must not read, match or create any file (local or gs://)."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"graph construction touched the filesystem: {args}")

    for name in ("match", "open", "create", "exists", "mkdirs", "copy", "rename", "delete"):
        monkeypatch.setattr(FileSystems, name, staticmethod(refuse))


def raw_pickle(pickled: bytes) -> bytes:
    """The pickle inside Beam's encoding (base64 of bz2, or zlib): a secret would show here, not there."""
    raw = base64.b64decode(pickled)
    try:
        return bz2.decompress(raw)
    except OSError:
        return zlib.decompress(raw)


def proto_payloads(proto: beam_runner_api_pb2.Pipeline) -> list[bytes]:
    """Every transform's payload, with the pickled DoFns and CombineFns decoded."""
    found = []
    for transform in proto.components.transforms.values():
        spec = transform.spec
        found.append(spec.payload)
        if spec.urn == common_urns.primitives.PAR_DO.urn:
            found.append(raw_pickle(beam_runner_api_pb2.ParDoPayload.FromString(spec.payload).do_fn.payload))
        elif spec.urn == common_urns.composites.COMBINE_PER_KEY.urn:
            found.append(raw_pickle(beam_runner_api_pb2.CombinePayload.FromString(spec.payload).combine_fn.payload))
    return found


def staged_files(proto: beam_runner_api_pb2.Pipeline) -> dict[str, str]:
    """``{staged name: local path}`` of every file the runner would upload for the workers."""
    found = {}
    for environment in proto.components.environments.values():
        for artifact in environment.dependencies:
            if artifact.role_urn == common_urns.artifact_roles.STAGING_TO.urn:
                name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload).staged_name
                found[name] = beam_runner_api_pb2.ArtifactFilePayload.FromString(artifact.type_payload).path
    return found


def transforms_of(p: beam.Pipeline) -> list[Any]:
    found: list[Any] = []

    class Collect(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node: Any) -> None:
            found.append(node.transform)

        def visit_transform(self, node: Any) -> None:
            found.append(node.transform)

    p.visit(Collect())
    return [t for t in found if t is not None]


def user_fns(transforms: list[Any]) -> list[Any]:
    """The DoFn of every ParDo and the CombineFn of every Combine: what a runner pickles to workers."""
    fns = []
    for transform in transforms:
        fn = getattr(transform, "fn", None)
        if isinstance(fn, (beam.DoFn, beam.CombineFn)):
            fns.append(fn)
    return fns


@pytest.mark.parametrize("auth", ["google", "token", "client-credentials"])
def test_graph_builds_for_dataflow_without_touching_inputs(auth, secrets_in_env, no_filesystem_access):
    options = PipelineOptions(dataflow_args() + ndop_args(f"{BUCKET}/requests/X26ABC1-241126-0001", auth,
                                                          str(secrets_in_env) if auth == "token" else None))
    p = beam.Pipeline(options=options)
    outputs = build_pipeline(p, options.view_as(NdopOptions))
    assert {"consents", "bundle_results", "dead_letters"} <= set(outputs)

    transforms = transforms_of(p)
    assert STAGES <= {t.label for t in transforms}
    fns = user_fns(transforms)
    assert OUR_FNS <= {type(fn).__name__ for fn in fns}
    assert any(isinstance(fn, beam.CombineFn) for fn in fns)  # CountIntegrityErrors
    for fn in fns:
        data = pickler.dumps(fn)
        assert SENTINEL.encode() not in raw_pickle(data), type(fn).__name__
        back = pickler.loads(data)
        assert type(back) is type(fn)
        if type(fn).__name__ in OUR_FNS:  # our settings survive the trip (clients are opened in setup())
            plain = {k: v for k, v in vars(fn).items() if isinstance(v, (str, int, float, bool, type(None)))}
            assert plain == {k: v for k, v in vars(back).items() if k in plain}, type(fn).__name__
            assert getattr(back, "_session", None) is None
    writer = next(fn for fn in fns if type(fn).__name__ == "_PostBundlesFn")
    assert pickler.loads(pickler.dumps(writer))._config == writer._config
    assert writer._config.auth == auth and writer._config.base_url == HEALTHCARE_URL
    assert HEALTHCARE_URL.encode() in raw_pickle(pickler.dumps(writer))  # the check above does see plain text

    payloads = proto_payloads(p.to_runner_api())  # every transform through the Runner API
    assert not [payload for payload in payloads if SENTINEL.encode() in payload]
    assert any(f"{BUCKET}/requests/X26ABC1-241126-0001/reply.dat".encode() in payload for payload in payloads)


def test_dataflow_dry_run_stages_only_the_package(monkeypatch, tmp_path, secrets_in_env, no_filesystem_access):
    """DataflowRunner translates the graph, builds the sdist from --setup_file and the job request."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the stager's build folder: under tmp_path
    egg_info = REPO_ROOT / "ndop_sync.egg-info"
    had_egg_info = egg_info.exists()
    options = PipelineOptions(dataflow_args() + ndop_args(f"{BUCKET}/requests/X26ABC1-241126-0001", "token"))
    p = beam.Pipeline(options=options)
    build_pipeline(p, options.view_as(NdopOptions))
    try:
        result = p.run()  # dry run: returns before any Dataflow API call
    finally:
        if not had_egg_info and egg_info.exists():  # `setup.py sdist` leaves it in the source tree
            import shutil

            shutil.rmtree(egg_info)
    assert result.state == "DONE"
    job = json.loads(result.job.json())
    assert SENTINEL not in result.job.json()
    assert job["type"] == "JOB_TYPE_BATCH"  # a bounded pipeline: Dataflow batch, not streaming
    assert not [payload for payload in proto_payloads(result.job.proto_pipeline) if SENTINEL.encode() in payload]

    staged = staged_files(result.job.proto_pipeline)
    assert "workflow.tar.gz" in staged, staged  # the sdist of --setup_file: what the workers pip-install
    assert all(Path(path).is_relative_to(tmp_path) for path in staged.values())
    for path in staged.values():
        assert SENTINEL.encode() not in Path(path).read_bytes()
    with tarfile.open(staged["workflow.tar.gz"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"setup.py", "pipeline/beam/graph.py", "pipeline/beam/options.py", "pipeline/fhir/search.py",
            "transforms/__init__.py"} <= names
    assert {str(f.relative_to(REPO_ROOT)) for package in ("pipeline", "transforms")
            for f in (REPO_ROOT / package).rglob("*.py")} <= names  # every subpackage too
    assert not [n for n in names if n.split("/")[0] in {"tests", "dev", "bench", ".git"} or ".venv" in n]


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(data)


def test_reads_and_builds_consents_from_mem_filesystem(mem_fs):
    """Inputs only on ``mem://``: any open()/os.path on them would fail, so this is FileSystems-only I/O."""
    numbers = nhs.synthetic_numbers(20, seed=9301).to_pylist()
    replied = numbers[5:]  # the first five opted out
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"nhs_number": pa.array(numbers, pa.string())}), sink)
    _write("mem://bucket/req/manifest.parquet", sink.getvalue().to_pybytes())
    _write("mem://bucket/req/reply.dat", datfile.encode(pa.array(replied, pa.string()), "crlf"))

    options = PipelineOptions(RUNNER_ARGS + ndop_args("mem://bucket/req", "none") + ["--shards=3"])
    opts = options.view_as(NdopOptions)
    check_inputs(opts)
    with beam.Pipeline(options=options) as p:
        outputs = build_pipeline(p, opts, until="consents")
        statuses = outputs["consents"] | beam.Map(lambda c: (c["id"], c["status"]))
        expected = [(consent_id(n), "active" if n not in replied else "inactive") for n in numbers]
        assert_that(statuses, equal_to(expected))
        assert_that(outputs["integrity_error_count"], equal_to([0]), label="NoIntegrityErrors")


def test_ndop_process_stages_to_a_remote_folder(work_dir, fhir_server, mem_fs):
    """``--stage-dir``: inputs copied out, the pipeline reads and writes only there, the record is updated."""
    numbers = nhs.synthetic_numbers(9, seed=9302).to_pylist()
    rid = "X26ABC1-241126-0901"
    _replied_request(work_dir, rid, numbers, numbers[2:])
    record = process_request(work_dir, rid, fhir_server, [*RUNNER_ARGS, "--shards=2", "--fhir_auth=none"],
                             stage_dir="mem://bucket/ndop")
    assert record["state"] == PROCESSED and record["processing"]["counts"]["written"] == 9
    assert {f"mem://bucket/ndop/{rid}/{name}" for name in ("manifest.parquet", "reply.dat", "summary.json",
                                                          "dead_letters.jsonl")} <= set(mem_fs)
    assert mem_fs[f"mem://bucket/ndop/{rid}/dead_letters.jsonl"][0] == b""
    local = json.loads((work_dir.request_dir(rid) / "summary.json").read_text())
    assert local["ok"] and local["dead_letters"] == f"mem://bucket/ndop/{rid}/dead_letters.jsonl"
    assert not (work_dir.request_dir(rid) / "dead_letters.jsonl").exists()
    assert [c["status"] for c in _consents_of(fhir_server, numbers[0])] == ["active"]
    assert [c["status"] for c in _consents_of(fhir_server, numbers[5])] == ["inactive"]


def test_ndop_process_stages_to_a_local_folder_privately(work_dir, fhir_server, tmp_path):
    """A local ``--stage-dir`` (a disk shared with a cluster) gets the same 0600/0700 care as the work dir."""
    numbers = nhs.synthetic_numbers(4, seed=9303).to_pylist()
    rid = "X26ABC1-241126-0902"
    _replied_request(work_dir, rid, numbers, numbers[1:])
    stage = tmp_path / "shared" / "ndop"
    record = process_request(work_dir, rid, fhir_server, [*RUNNER_ARGS, "--shards=2", "--fhir_auth=none"],
                             stage_dir=str(stage))
    assert record["state"] == PROCESSED and record["processing"]["counts"]["written"] == 4
    for name in ("manifest.parquet", "reply.dat", "dead_letters.jsonl", "summary.json"):
        assert (stage / rid / name).stat().st_mode & 0o777 == 0o600, name
    assert (stage / rid).stat().st_mode & 0o777 == 0o700
    assert (stage / rid / "manifest.parquet").read_bytes() == (work_dir.request_dir(rid) / "manifest.parquet").read_bytes()
