"""What a launcher may hand the workers besides data: callbacks for its own progress line and, in crash tests
only, a named point to die at. A remote runner's workers get none (:data:`NO_HOOKS`); production never carries a
fault point. Callbacks must pickle by reference (module-level functions), as Beam ships DoFns to workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class WorkerHooks:
    expect_writes: Callable[[int], None] | None = None  # the join decided this many Consents to write
    wrote: Callable[[int], None] | None = None  # a bundle of this many Consents is done (stored or dead-lettered)
    fault: Callable[[str], None] | None = None  # tests: called at a named point (e.g. "after-first-bundle")

    def expecting(self, count: int) -> None:
        if self.expect_writes is not None:
            self.expect_writes(count)

    def written(self, count: int) -> None:
        if self.wrote is not None:
            self.wrote(count)

    def at(self, point: str) -> None:
        if self.fault is not None:
            self.fault(point)


NO_HOOKS = WorkerHooks()
