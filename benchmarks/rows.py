"""What the CPU benchmarks share: the results file and peak-RSS measurement (Linux /proc)."""

from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")
"""Every benchmark appends its JSON rows here."""


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
