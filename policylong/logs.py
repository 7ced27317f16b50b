"""Logging as every PolicyLong process sets it up (the CLI, the overlapped screener)."""

from __future__ import annotations

import logging

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
