"""The output-folder contract of every command that writes.

- A command writes only its own kind of output: a non-empty folder that holds something else
  (the user's files, another command's output) is refused, naming what is there.
- ``--overwrite`` replaces only the command's own kind of output, and only once the new one is
  complete: it is built beside (``DIR.partial``) and swapped in (``swap_in``).
- One writer per folder: ``output_lock`` holds ``DIR.lock`` (``flock``, released by the kernel
  when the process dies, so a killed run leaves no stale lock) and removes it when done.
- The folder's first existing ancestor must be a writable folder; this is checked before any
  model work.

A kind is recognised by the files that its command always writes (``KINDS``), so outputs
written before this contract existed are recognised too and no marker file joins the bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil

from policylong.errors import OutputError

KINDS = {
    "corpus": ("a synthetic corpus", ("docs.jsonl", "passages.jsonl", "ground_truth.jsonl")),
    "stage": ("a stage dataset", ("manifest.json", "data.bin", "data.idx")),
    "checkpoint": ("a PolicyLong Megatron checkpoint", ("policylong.json",)),
    "hf": ("a Hugging Face model folder", ("config.json",)),
    "report": ("a loop report", ("report.json",)),
    "eval": ("an evaluation (eval.json)", ("eval.json",)),
    "tasks_eval": ("a task evaluation (tasks_eval.json)", ("tasks_eval.json",)),
    "index": ("a passage index", ("meta.json", "faiss.index")),
}
"""Kind -> (what it is called in messages, the files that make a folder that kind)."""

_LEFTOVERS = {
    "checkpoint": lambda n: (
        n in ("hf", "policylong.json.tmp", "metrics.jsonl", "tensorboard") or n.startswith("iter_")
    ),
    "report": lambda n: n == "report.json.tmp" or n.endswith(".png"),
}
"""Kind -> the names a run of its command killed before its marker file leaves behind (a
training run killed while writing ``policylong.json``, a report killed before its JSON): such
a folder is still its own."""


def kind_of(path: str) -> str | None:
    """The kind of output folder ``path`` holds, or None (not a folder, empty, or foreign)."""
    if not os.path.isdir(path):
        return None
    names = set(os.listdir(path))
    for kind, (_, files) in KINDS.items():
        if all(f in names for f in files):
            return kind
    for kind, mine in _LEFTOVERS.items():
        if names and all(mine(n) for n in names):
            return kind
    return None


def describe(path: str) -> str:
    """What ``path`` holds, in words, for an error message."""
    if not os.path.lexists(path):
        return "nothing"
    if not os.path.isdir(path):
        return "a file"
    kind = kind_of(path)
    if kind is not None:
        return KINDS[kind][0]
    names = sorted(os.listdir(path))
    if not names:
        return "an empty folder"
    shown = ", ".join(n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in names[:5])
    more = f", ... ({len(names)} entries)" if len(names) > 5 else ""
    return f"other files ({shown}{more})"


def check_writable(path: str) -> None:
    """``path`` can be created or written: its first existing ancestor is a writable folder."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not os.path.isdir(p):
        raise OutputError(f"{path}: cannot write here, {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write here, {p} is not writable")


def check_output(path: str, kind: str, overwrite: bool = False, resume: bool = False) -> bool:
    """Check that a command may write its ``kind`` of output to ``path`` before it does any
    work. A missing or empty folder is fine; a folder of the same kind is fine with
    ``overwrite`` (replaced when the new one is complete) or ``resume`` (the command continues
    or keeps it); anything else is an ``OutputError`` naming what is there. Returns True when
    ``path`` already holds this kind of output."""
    what = KINDS[kind][0]
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{path}: is a file, not a folder; choose another output folder")
    check_writable(path)
    if not os.path.isdir(path) or not os.listdir(path):
        return False
    if kind_of(path) != kind:
        raise OutputError(
            f"{path}: holds {describe(path)}, not {what}; it is not this command's output, "
            "so it is left as it is: choose another folder or empty it"
        )
    if not (overwrite or resume):
        raise OutputError(f"{path}: already holds {what}; pass --overwrite to replace it")
    return True


def swap_in(new_dir: str, final_dir: str) -> None:
    """Put the complete ``new_dir`` in place of ``final_dir`` (which may not exist): the old
    one is renamed aside first and removed only once the new one is in place, so a crash
    leaves one of them whole (the old one as ``DIR.old`` if it falls between the renames)."""
    old = final_dir.rstrip("/") + ".old"
    if os.path.lexists(old):
        shutil.rmtree(old)
    if os.path.lexists(final_dir):
        os.replace(final_dir, old)
    os.replace(new_dir, final_dir)
    if os.path.lexists(old):
        shutil.rmtree(old)


@contextlib.contextmanager
def output_lock(path: str, wait: bool = False):
    """Hold ``path.lock`` while writing ``path``: a second writer gets an ``OutputError``
    naming the holder's pid (``wait``: it blocks until the first is done). The lock file is
    removed on exit; a process killed holding it leaves the file but not the lock."""
    lock = path.rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"{path}: another process (pid {holder}) is writing it ({lock} is locked); "
                "wait for it to finish"
            ) from None
        # the previous holder may have removed the file we were waiting on: lock the new one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
