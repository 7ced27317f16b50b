"""The one family of user-facing errors.

Every failure a user can fix (a bad config value, a missing or malformed corpus, an index that
does not match, a stage folder that is not what it should be, a checkpoint or model that cannot
be used, an output folder that is not this command's own) raises a subclass of
``PolicyLongError``. The CLI prints these as one line and exits 2; every other exception (a bug,
CUDA out of memory, an NCCL failure) propagates with its traceback.

The subclasses also derive from the built-in exception that code catching them used before
(``ValueError``, ``FileNotFoundError``, ``FileExistsError``), so callers written against those
keep working.
"""

from __future__ import annotations


class PolicyLongError(Exception):
    """A failure the user can fix; its message names the file, field or value."""


class ConfigError(PolicyLongError, ValueError):
    """A config value, preset file or command-line number that cannot be used."""


class InputNotFoundError(PolicyLongError, FileNotFoundError):
    """A file or folder the command reads does not exist."""


class OutputError(PolicyLongError, FileExistsError):
    """An output folder that is not this command's own kind of output, or that another process
    is writing (its lock is held)."""


class ResumeError(PolicyLongError, ValueError):
    """A partial output was written from other inputs than the rerun's; resuming would mix
    them. The message names the input that changed."""


class ModelError(PolicyLongError, ValueError):
    """A model that cannot be used: non-finite weights or logits, an unsupported config."""


class SetupError(PolicyLongError, RuntimeError):
    """An installed package or a device that does not fit the run (a megatron-core release the
    CPU layer does not know, no GPU for a GPU-only option)."""
