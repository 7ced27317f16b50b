"""The passage store: passage ids and texts by row, memory-mapped from Arrow IPC files.

Screening reads a passage by row (``store.texts[row]``) or finds the row of an id
(``store.row[pid]``) without loading the store: both files are Arrow IPC (Feather v2) files,
uncompressed, opened over a read-only memory map (pyarrow reads the schema and the batches'
metadata; columns are zero-copy views). A single row is read with ``os.pread`` at its Arrow
buffers' file offsets, so the resident memory of an open store grows neither with the corpus
nor with the fetches (benchmarks/INDEX.md); whole shards are read through the map (builds).

    passages.arrow      columns id, text (string); row i = vector i of the FAISS index
    passages.ids.arrow  columns id (sorted bytewise), row (uint64): the id -> row lookup,
                        a binary search over the sorted column (27 probes at 10^8 passages)

Index folders of earlier versions hold ``passages.jsonl`` (one ``{"id", "text"}`` per row);
``open_store`` still reads it, into lists (fine for small corpora).
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import struct
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from .errors import PolicyLongError

STORE = "passages.arrow"
LOOKUP = "passages.ids.arrow"
LEGACY = "passages.jsonl"

BATCH_ROWS = 65536
"""Rows per Arrow record batch: ~160 MB of 512-token passages, so a string column's int32
offsets (2 GB per batch) never overflow, and opening the file (which reads every batch's
metadata) touches 1,526 small messages at 10^8 passages."""

_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
_LOOKUP_SCHEMA = pa.schema([("id", pa.string()), ("row", pa.uint64())])


class StoreError(PolicyLongError, RuntimeError):
    """A passage store that is missing, corrupt, or holds a repeated passage id."""


# -- writing -----------------------------------------------------------------------------------


def write_store(path: str, passages: Iterable[tuple[str, str]]) -> int:
    """Stream ``(id, text)`` pairs into the Arrow file ``path`` (written as ``path.tmp``, renamed
    when complete); returns the number of rows. Memory: one batch of ``BATCH_ROWS`` rows."""
    tmp = path + ".tmp"
    n = 0
    ids: list[str] = []
    texts: list[str] = []
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as w:

        def flush():
            w.write_batch(pa.record_batch([pa.array(ids, pa.string()), pa.array(texts)], _SCHEMA))
            ids.clear()
            texts.clear()

        for pid, text in passages:
            ids.append(pid)
            texts.append(text)
            n += 1
            if len(ids) == BATCH_ROWS:
                flush()
        if ids or n == 0:
            flush()
    os.replace(tmp, path)
    return n


def write_lookup(store_path: str, path: str, shard_rows: int | None = None) -> None:
    """Write the sorted id -> row file of the store at ``store_path``; raise ``StoreError`` on a
    repeated id, naming both rows (and their embedding shards when ``shard_rows`` is given).

    ``pyarrow.compute.sort_indices`` (stable) orders the ids; memory is the sort's: 8 bytes of
    index per row plus the id column (~1.2 GB at 10^8 passages), in the one process that writes
    the store."""
    table = _open_table(store_path)
    col = table.column("id")
    order = pc.sort_indices(col)
    tmp = path + ".tmp"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, _LOOKUP_SCHEMA) as w:
        prev_id, prev_row = None, None
        for s in range(0, len(order), 1 << 20):
            rows = order.slice(s, 1 << 20)
            ids = pc.take(col, rows).combine_chunks()
            if len(ids) > 1:
                same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
                hit = pc.index(same, True).as_py()
                if hit >= 0:
                    _repeated(
                        ids[hit].as_py(), rows[hit].as_py(), rows[hit + 1].as_py(), shard_rows
                    )
            if prev_id is not None and ids[0].as_py() == prev_id:
                _repeated(prev_id, prev_row, rows[0].as_py(), shard_rows)
            prev_id, prev_row = ids[-1].as_py(), rows[-1].as_py()
            for b in range(0, len(ids), BATCH_ROWS):
                w.write_batch(
                    pa.record_batch(
                        [ids.slice(b, BATCH_ROWS), rows.slice(b, BATCH_ROWS).cast(pa.uint64())],
                        _LOOKUP_SCHEMA,
                    )
                )
        if len(order) == 0:
            w.write_batch(
                pa.record_batch(
                    [pa.array([], pa.string()), pa.array([], pa.uint64())], _LOOKUP_SCHEMA
                )
            )
    os.replace(tmp, path)


def _repeated(pid: str, a: int, b: int, shard_rows: int | None) -> None:
    a, b = sorted((a, b))
    where = f"rows {a} and {b}"
    if shard_rows:
        where += f" (embedding shards {a // shard_rows} and {b // shard_rows})"
    raise StoreError(f"passage id {pid!r} is repeated: {where}; passage ids must be unique")


# -- reading -----------------------------------------------------------------------------------


def _open_table(path: str, random_access: bool = False) -> pa.Table:
    """The Arrow file at ``path`` as a table over a read-only memory map (zero-copy).

    ``random_access``: ``madvise(MADV_RANDOM)`` on the map (no readahead around a page)."""
    return _open_mapped(path, random_access)[0]


def _open_mapped(path: str, random_access: bool = False) -> tuple[pa.Table, int]:
    """(table, address of the map's first byte): buffer addresses minus it are file offsets."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if random_access and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_RANDOM)
        buf = pa.py_buffer(mm)  # keeps the map alive as long as any column sliced from it
        return pa.ipc.open_file(pa.BufferReader(buf)).read_all(), buf.address
    except (OSError, ValueError, pa.ArrowInvalid) as e:
        raise StoreError(f"{path}: unreadable passage store ({e})") from e


class _U64:
    """Row i of a uint64 column, by ``os.pread`` (as ``_Rows``)."""

    def __init__(self, fd: int, col: pa.ChunkedArray, base: int):
        self.fd = fd
        self.starts, self.data = [0], []
        for ch in col.chunks:
            self.data.append(ch.buffers()[1].address - base + 8 * ch.offset)
            self.starts.append(self.starts[-1] + len(ch))

    def __call__(self, i: int) -> int:
        k = bisect.bisect_right(self.starts, i) - 1
        return struct.unpack("<Q", os.pread(self.fd, 8, self.data[k] + 8 * (i - self.starts[k])))[0]


class _Rows:
    """Row i of a string column read with ``os.pread`` at the file offsets of its Arrow
    buffers (the int32 offsets, then the bytes). Nothing of the map is touched, so a fetch
    brings in no page of the process (a touch of a mapped page maps up to 16 cached
    neighbours, 64 KB, "fault-around": 2,000 fetches made 160 MB resident on a 180 MB store)."""

    def __init__(self, path: str, col: pa.ChunkedArray, base: int):
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        starts, offsets, data = [0], [], []
        for ch in col.chunks:
            if ch.null_count:
                raise StoreError(f"{path}: null {col.type} values in the passage store")
            b = ch.buffers()  # [validity, int32 offsets, bytes]: addresses only, no read
            offsets.append(b[1].address - base + 4 * ch.offset)
            data.append(b[2].address - base if b[2] is not None else 0)
            starts.append(starts[-1] + len(ch))
        self.starts, self.offsets, self.data = starts, offsets, data

    def __call__(self, i: int) -> str:
        k = bisect.bisect_right(self.starts, i) - 1
        j = i - self.starts[k]
        a, b = struct.unpack("<ii", os.pread(self.fd, 8, self.offsets[k] + 4 * j))
        return os.pread(self.fd, b - a, self.data[k] + a).decode("utf-8")


class Column(Sequence):
    """One string column of a memory-mapped Arrow table as a read-only sequence of ``str``."""

    def __init__(self, col: pa.ChunkedArray, rows: _Rows | None = None):
        self._col = col
        self._rows = rows

    def __len__(self) -> int:
        return len(self._col)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._col[i].to_pylist()
        if i < 0:
            i += len(self._col)
        if not 0 <= i < len(self._col):
            raise IndexError(f"row {i} out of range [0, {len(self._col)})")
        return self._rows(i) if self._rows is not None else self._col[i].as_py()

    def __iter__(self) -> Iterator[str]:
        for chunk in self._col.chunks:
            yield from chunk.to_pylist()

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


class RowLookup(Mapping):
    """id -> row over the sorted lookup file: binary search, nothing loaded."""

    def __init__(self, ids: pa.ChunkedArray, rows: pa.ChunkedArray, read_id=None, read_row=None):
        self._ids = ids
        self._id = read_id or (lambda k: ids[k].as_py())
        self._row = read_row or (lambda k: rows[k].as_py())

    def _find(self, pid: str) -> int:
        lo, hi = 0, len(self._ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._id(mid) < pid:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self._ids) and self._id(lo) == pid:
            return lo
        return -1

    def __getitem__(self, pid: str) -> int:
        k = self._find(pid) if isinstance(pid, str) else -1
        if k < 0:
            raise KeyError(pid)
        return int(self._row(k))

    def __contains__(self, pid) -> bool:
        return isinstance(pid, str) and self._find(pid) >= 0

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        for chunk in self._ids.chunks:
            yield from chunk.to_pylist()


class PassageStore:
    """ids, texts and the id -> row lookup of an index folder's passage store."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], row: Mapping[str, int]):
        self.ids = ids
        self.texts = texts
        self.row = row

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_lists(cls, ids: list[str], texts: list[str]) -> PassageStore:
        return cls(ids, texts, {pid: i for i, pid in enumerate(ids)})


def open_store(index_dir: str, random_access: bool = True) -> PassageStore:
    """The store of ``index_dir``: memory-mapped Arrow files, or a legacy ``passages.jsonl``.
    ``random_access``: reads by row (screening); False for reading shards in order (builds)."""
    store = os.path.join(index_dir, STORE)
    if os.path.isfile(store):
        lk_path = os.path.join(index_dir, LOOKUP)
        table, base = _open_mapped(store, random_access)
        lk, lk_base = _open_mapped(lk_path, random_access)
        if lk.num_rows != table.num_rows:
            raise StoreError(
                f"{index_dir}: {LOOKUP} has {lk.num_rows} rows but {STORE} {table.num_rows}"
            )
        ids, texts = table.column("id"), table.column("text")
        if not random_access:
            return PassageStore(Column(ids), Column(texts), RowLookup(lk["id"], lk["row"]))
        return PassageStore(
            Column(ids, _Rows(store, ids, base)),
            Column(texts, _Rows(store, texts, base)),
            RowLookup(
                lk["id"],
                lk["row"],
                (ids_lk := _Rows(lk_path, lk["id"], lk_base)),
                _U64(ids_lk.fd, lk["row"], lk_base),
            ),
        )
    ids, texts = [], []
    path = os.path.join(index_dir, LEGACY)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                o = json.loads(line)
                ids.append(o["id"])
                texts.append(o["text"])
            except (json.JSONDecodeError, KeyError) as e:
                raise StoreError(f"{path}: line {lineno}: corrupt ({e})") from e
    return PassageStore.from_lists(ids, texts)


def store_files(index_dir: str) -> list[str]:
    """The store's file names present in ``index_dir`` (Arrow pair, else the legacy JSONL)."""
    if os.path.isfile(os.path.join(index_dir, STORE)) or not os.path.isfile(
        os.path.join(index_dir, LEGACY)
    ):
        return [STORE, LOOKUP]
    return [LEGACY]
