"""What a step cache cost: each cached job's result paired with its uncached twin's.

A cached job (`--cache fbc:0.1`) and its twin (the same job with `cache=none`: `generate
--cache-reference`, or a sweep whose cache axis includes none) both keep their frames as made
(`Job.keep_frames`). A cached result waits here until its twin's is known, then gets
`stages.cache.versus_uncached`'s figures in its metrics, before it is tracked. Results arrive in
any order (a pipelined stream, a sweep's replicas), so this holds only what still waits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from stages.cache import versus_uncached

# A finished twin made before this run (a resumed sweep's): its frames as made and its metrics.
Earlier = tuple[np.ndarray, dict[str, float]]


def paired_with_uncached(
    finished: Iterable[Any],
    twins: dict[int, int],
    index_of: Callable[[Any], int],
    result_of: Callable[[Any], Any],
    earlier: dict[int, Earlier] | None = None,
) -> Iterator[Any]:
    """`finished` items as they come, except that a cached job's (index in `twins`, mapped to its
    twin's index) comes once its twin's result is there, with what the cache cost against it. A
    failed job (no `frames`) on either side leaves the cached result without those figures."""
    known: dict[int, Earlier | None] = dict(earlier or {})
    partners = Counter(twins.values())  # cached jobs still to compare with each twin
    waiting: dict[int, Any] = {}
    for item in finished:
        index, result = index_of(item), result_of(item)
        if index in partners:
            frames = getattr(result, "frames", None)
            known[index] = None if frames is None else (frames, result.metrics)
            result.frames = None  # kept here until its last cached partner is compared
        if index in twins:
            waiting[index] = item
        for cached in [i for i in waiting if twins[i] in known]:  # before their twin, in job order
            ready, twin = waiting.pop(cached), twins[cached]
            _compare(result_of(ready), known[twin])
            partners[twin] -= 1
            if not partners[twin]:
                del known[twin]
            yield ready
        if index not in twins:
            yield item
    yield from waiting.values()  # twins that never came: the cached results as they are


def _compare(result: Any, twin: Earlier | None) -> None:
    frames = getattr(result, "frames", None)
    if twin is not None and frames is not None:
        result.metrics.update(versus_uncached(frames, result.metrics, *twin))
    if frames is not None:
        result.frames = None
