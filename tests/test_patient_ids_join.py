"""Issue 24 item 2: Patient ids travel through the shard join as its fourth input, not as an ``AsDict`` side input
(which put every patient's id, about 100 bytes each, in every worker: 1.5-2 GB at 10M)."""
from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import AsDict
from apache_beam.testing.util import assert_that, equal_to

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.beam.options import NdopOptions
from pipeline.beam.graph import build_pipeline
from tests.beam_util import RUNNER_ARGS
from tests.test_portability import transforms_of
from transforms.build_consent import BuildConsentFn
from transforms.shards import split_table_by_shard
from transforms.read_inputs import known_patient_ids, patient_ids_for

T1 = "2024-11-26T10:15:00Z"


def test_patient_ids_for_looks_up_a_shards_blocks():
    table = pa.table({"nhs_number": pa.array(["9990000018", "9990000026", "9990000018", "9990000034"]),
                      "patient_id": pa.array(["p-1", "p-2", "p-1-again", None])})
    known = known_patient_ids(table)
    assert known.column("patient_id").to_pylist() == ["p-1", "p-2", "p-1-again"]  # the unknown one dropped
    blocks = [block for _, block in split_table_by_shard(known, 1)]
    numbers = np.array([9990000034, 9990000018, 9990000026, 9990000042], dtype=np.int64)
    assert patient_ids_for(numbers, blocks) == [None, "p-1", "p-2", None]  # a listed-twice number: its first id
    assert patient_ids_for(numbers, []) == [None] * 4
    assert patient_ids_for(numbers[:0], blocks) == []


def _request(folder: Path) -> tuple[list[str], dict[str, str]]:
    numbers = nhs.synthetic_numbers(40, seed=9701).to_pylist()
    ids = {n: f"pat-{i}" for i, n in enumerate(numbers) if i % 3}  # every third patient's id unknown
    pq.write_table(pa.table({"nhs_number": pa.array(numbers),
                             "patient_id": pa.array([ids.get(n) for n in numbers], pa.string())}),
                   folder / "manifest.parquet")
    (folder / "reply.dat").write_bytes(datfile.encode(pa.array(numbers[::2], pa.string()), "crlf"))
    return numbers, ids


def _options(folder: Path) -> PipelineOptions:
    return PipelineOptions(RUNNER_ARGS + [
        f"--manifest={folder / 'manifest.parquet'}", f"--reply={folder / 'reply.dat'}", f"--checked_at={T1}",
        f"--output_dir={folder}", "--fhir_url=http://127.0.0.1:9/fhir", "--fhir_auth=none", "--patient_ids",
        "--shards=3", "--batch_size=4", "--provenance_org=X26ABC1"])


def test_consents_reference_the_patient_from_the_join(tmp_path):
    numbers, ids = _request(tmp_path)
    options = _options(tmp_path)
    with beam.Pipeline(options=options) as p:
        outputs = build_pipeline(p, options.view_as(NdopOptions), until="consents")
        refs = outputs["consents"] | beam.Map(lambda c: (c["patient"]["identifier"]["value"],
                                                         c["patient"].get("reference")))
        assert_that(refs, equal_to([(n, f"Patient/{ids[n]}" if n in ids else None) for n in numbers]))


def test_no_worker_holds_the_cohorts_patient_ids(tmp_path):
    """No step takes the Patient ids as a side input: BuildConsent takes none, and no AsDict is left anywhere."""
    _request(tmp_path)
    options = _options(tmp_path)
    p = beam.Pipeline(options=options)
    build_pipeline(p, options.view_as(NdopOptions))
    transforms = transforms_of(p)
    build = [t for t in transforms if isinstance(getattr(t, "fn", None), BuildConsentFn)]
    assert build and all(not t.side_inputs for t in build)
    assert not [t.label for t in transforms for side in getattr(t, "side_inputs", ()) if isinstance(side, AsDict)]
