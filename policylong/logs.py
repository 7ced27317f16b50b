"""Logging as every PolicyLong process sets it up (the CLI, the overlapped screener)."""

from __future__ import annotations

import json
import logging
import os
import signal

log = logging.getLogger("policylong")

FAULT_ENV = "POLICYLONG_FAULT"
"""Fault injection for the resumability tests: a comma-separated list of points. Stage loop:
``screen:T:B`` (die after batch B of stage T's screening is on disk), ``train:T:S`` (die after
training step S of stage T), ``stage:T`` (die after stage T finished, before it is recorded in
loop.json). Alignment: ``align:rollout:S`` (die after step S's rollouts, before its update),
``align:step:S`` (after its update, before its save), ``align:save:S`` (while saving step S:
shards written, folder not yet renamed). "Die" is SIGKILL: nothing is flushed or cleaned up,
as in a preempted job."""


def faults() -> set[str]:
    """The fault points of ``FAULT_ENV``."""
    return {f.strip() for f in os.environ.get(FAULT_ENV, "").split(",") if f.strip()}


def die_if(point: str) -> None:
    """SIGKILL this process when ``point`` is one of ``faults()``."""
    if point in faults():
        log.warning("%s=%s: killing this process at %s", FAULT_ENV, os.environ[FAULT_ENV], point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


_NOISY = ("sentence_transformers", "transformers", "faiss", "httpx", "megatron")


def setup_logging(verbose: bool = False) -> None:
    """One line per record (time, level, logger); third-party loggers at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the lines of ``path`` (JSON lines with a ``step``) after ``step``, keeping the rest
    byte for byte: what a resumed run does to the logs of steps it did not save."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


class MetricsLog:
    """One JSON line per step in ``path`` (``metrics.jsonl``) and, when the ``tensorboard``
    package is installed, the same numbers as TensorBoard scalars under ``tb_dir`` (as
    Megatron-LM's ``training_log`` writes them: one tag per metric, the step as x).

    ``resume_step``: lines of steps after it are dropped first (a killed run logged steps it
    did not save); the rest stay byte for byte."""

    def __init__(self, path: str, tb_dir: str | None = None, resume_step: int = 0):
        self.path = path
        truncate_jsonl(path, resume_step)
        self.tb = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; metrics.jsonl has everything
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=tb_dir, purge_step=resume_step + 1)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
