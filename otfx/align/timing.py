"""Seconds per stage of an alignment (rows, cost, solve, plans, rewrite, ...), each exclusive of nested stages."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """``with watch("cost"): ...`` adds the block's time to ``watch.timings["cost"]``, less nested stages'."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = defaultdict(float)
        self._open: list[list[float]] = []  # per open stage: [time spent in stages nested in it]

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        self._open.append([0.0])
        try:
            yield
        finally:
            nested = self._open.pop()[0]
            elapsed = time.perf_counter() - start
            self.timings[stage] += elapsed - nested
            if self._open:
                self._open[-1][0] += elapsed
