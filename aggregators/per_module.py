"""Aggregate a model's modules two at a time, each on its own share of the cores.

Modules are independent, and one module's aggregation does not keep two cores busy (stacking the
clients' factors is page faults on one core, small cores and QR barely split), so two modules at
once with one thread each finish sooner: 0.68x the sequential time for 100 clients at 4096 x 4096
on 2 cores (bench/aggregate.py, model7b section). `torch.set_num_threads` in a worker thread sets
that thread's own OpenMP team size; the calling thread keeps its count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
WORKERS = 2  # modules at once (measured on 2 cores; more only multiplies peak memory)


def map_modules(
    fn: Callable[[str], T], modules: Sequence[str], *, workers: int = WORKERS
) -> dict[str, T]:
    """{module: fn(module)}, `workers` modules at a time on cores // workers threads each."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(modules) < 2:
        return {m: fn(m) for m in modules}
    threads = max(1, torch.get_num_threads() // workers)

    def run(module: str) -> T:
        torch.set_num_threads(threads)  # this worker thread's own team
        return fn(module)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aggregate") as pool:
        return dict(zip(modules, pool.map(run, modules), strict=True))
