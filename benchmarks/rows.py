"""What the benchmarks share: the results file, the row header, peak-RSS measurement (Linux)."""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")
"""Every benchmark appends its JSON rows here."""


def append_rows(rows: list[dict], meta: dict | None = None) -> None:
    """Append ``rows`` (each after ``meta``'s fields) to ``RESULTS`` and say so."""
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as f:
        for r in rows:
            f.write(json.dumps({**(meta or {}), **r}) + "\n")
    print(f"appended {len(rows)} rows to {RESULTS}")


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` field (VmRSS, VmHWM, ...) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Reset VmHWM (the peak RSS) so that it measures only what follows (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_meta(bench: str, cuda: bool) -> dict:
    """The fields every row of a run starts with: what ran, when, on which machine."""
    import torch

    return {
        "bench": bench,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "device_name": torch.cuda.get_device_name()
        if cuda
        else platform.processor() or platform.machine(),
    }


def in_fresh_process(target, args: tuple, error_row: dict) -> dict:
    """Run ``target(*args, queue)`` in a spawned process (so its peak RSS is its own) and
    return the row it puts on the queue, or ``error_row`` with the exit code if it died."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {**error_row, "error": f"exit code {p.exitcode} (out of memory?)"}
    return q.get()
