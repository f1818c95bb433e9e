"""NHS numbers as int64 arrays, hashed into join shards.

Per-element CoGroupByKey costs about 50 us an element on the local runners (docs/benchmarks.md); the join
instead moves one ``(shard, bytes)`` element per shard per input block, where the bytes are a
little-endian int64 array of numbers. A 10-digit NHS number always fits an int64 and compares,
sorts and hashes as fast as numpy can, and ``bytes`` takes Beam's cheapest coder on every runner.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.core import nhs

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads sequential numbers evenly
DTYPE = np.dtype("<i8")


def to_int64(numbers: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Normalised 10-digit number strings as int64."""
    if isinstance(numbers, pa.ChunkedArray):
        numbers = numbers.combine_chunks() if numbers.num_chunks else pa.array([], pa.string())
    if len(numbers) == 0:
        return np.zeros(0, dtype=DTYPE)
    return nhs.to_int64(numbers).astype(DTYPE, copy=False)


def to_strings(numbers: np.ndarray) -> list[str]:
    """int64 numbers back to their 10-digit text (leading zeros kept)."""
    return [f"{n:010d}" for n in numbers.tolist()]


def shard_of(numbers: np.ndarray, shards: int) -> np.ndarray:
    """The join shard of each number: a stable hash, the same on every worker and every run."""
    mixed = (numbers.astype(np.uint64) * _GOLDEN) >> np.uint64(32)
    return (mixed % np.uint64(shards)).astype(np.int64)


def split_by_shard(numbers: np.ndarray, shards: int) -> Iterator[tuple[int, bytes]]:
    """``(shard, int64 bytes)`` for every shard that holds at least one of ``numbers``."""
    if len(numbers) == 0:
        return
    keys = shard_of(numbers, shards)
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=shards)
    ordered = numbers[order].astype(DTYPE, copy=False)
    start = 0
    for shard, count in enumerate(counts.tolist()):
        if count:
            yield shard, ordered[start : start + count].tobytes()
        start += count


def chunks(numbers: np.ndarray, size: int | None) -> Iterator[np.ndarray]:
    """``numbers`` in consecutive slices of at most ``size`` (views, no copy); ``None``: the whole array once."""
    if len(numbers) == 0:
        return
    step = len(numbers) if not size else size
    for start in range(0, len(numbers), step):
        yield numbers[start : start + step]


def from_bytes(blocks: list[bytes] | tuple[bytes, ...]) -> np.ndarray:
    """Concatenate ``(shard, bytes)`` payloads back into one int64 array."""
    if not blocks:
        return np.zeros(0, dtype=DTYPE)
    return np.frombuffer(b"".join(blocks), dtype=DTYPE)


# -- Arrow tables keyed by NHS number (ledger shards, Patient ids): one zstd Arrow IPC stream per shard ---------

_IPC = pa.ipc.IpcWriteOptions(compression="zstd")


def table_to_bytes(table: pa.Table) -> bytes:
    """An Arrow table (a ledger shard, Patient ids) as one zstd-compressed Arrow IPC stream (bytes: Beam's cheapest
    coder).

    Compressed, a ledger shard moves through the runner's buffers in about a third of its Arrow size. (A ledger
    file that is one shard's moves as its path instead: transforms/ledger_join.py.)
    """
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_IPC) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def split_table_by_shard(table: pa.Table, shards: int) -> Iterator[tuple[int, bytes]]:
    """``(shard, Arrow IPC bytes)`` for every shard that holds at least one of the table's rows (by its
    ``nhs_number`` column)."""
    if table.num_rows == 0:
        return
    keys = shard_of(table.column("nhs_number").to_numpy(), shards)
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=shards)
    ordered = table.take(pa.array(order))
    start = 0
    for shard, count in enumerate(counts.tolist()):
        if count:
            yield shard, table_to_bytes(ordered.slice(start, count))
        start += count
