"""Shared helpers of the benchmarks: timing, peak memory in a fresh process, tables."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import time
from typing import Any, Callable

import torch


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads "
            f"(torch uses {torch.get_num_threads()}), {gpu}, torch {torch.__version__}")


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: bool = False) -> float:
    """Fastest seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    The fastest run, not the mean or median: on a shared or virtual machine other load only
    ever adds time, so the minimum is the figure that repeats from one run to the next.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(queue, fn, args):
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as err:  # report, don't hang the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def in_fresh_process(fn: Callable, *args) -> Any:
    """Run ``fn(*args)`` in a new process, so peak memory is that measurement's own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status == "error":
        raise RuntimeError(value)
    return value


def table(rows: list[dict], floats: str = "{:.2f}") -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[floats.format(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
