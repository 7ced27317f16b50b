"""LongBlocks question answering: Parquet rows of a long document, a question, its answer and
teacher responses, read as task records.

A row's prompt is ``TEMPLATE`` filled with its ``document`` and ``question``; the reference
answer is its ``answer``. Two families score the response's first line: ``longblocks_em``
(exact match after SQuAD normalisation) and ``longblocks_f1`` (SQuAD token F1).
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from .haystack import count_tokens
from .records import Family, TaskError, TaskRecord, first_line, normalize_answer, token_f1

TEMPLATE = "{document}\n\nQuestion: {question}\nAnswer:"
"""The prompt of a row: the document, a blank line, the question, then ``Answer:`` for the
response to continue."""

COLUMNS = ("id", "document", "question", "answer")
"""Columns every LongBlocks file must have."""

CARRIED = ("source", "language")
"""Columns copied into ``meta`` when the file has them."""


def verify_longblocks_em(response: str, rec: TaskRecord) -> float:
    """1.0 when the response's first line equals the answer after normalisation."""
    return float(normalize_answer(first_line(response)) == normalize_answer(rec.answer))


def verify_longblocks_f1(response: str, rec: TaskRecord) -> float:
    """SQuAD token F1 of the response's first line against the answer."""
    return token_f1(first_line(response), rec.answer)


LONGBLOCKS_EM = Family("longblocks_em", verify_longblocks_em, ("\n",))
LONGBLOCKS_F1 = Family("longblocks_f1", verify_longblocks_f1, ("\n",))
LONGBLOCKS = {f.name: f for f in (LONGBLOCKS_EM, LONGBLOCKS_F1)}


def _text(path: str, row: int, rid, column: str, value, required: bool = True) -> str:
    """``value`` as a non-empty string; TaskError naming the file, row and column."""
    where = f"{path}: row {row}" + (f" (id {rid!r})" if rid is not None else "")
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise TaskError(f"{where}: column {column!r} is empty")
        return ""
    if not isinstance(value, str):
        raise TaskError(f"{where}: column {column!r} is a {type(value).__name__}, not text")
    return value


def read_longblocks(
    path: str,
    family: str = "longblocks_em",
    teacher_column: str | None = None,
    limit: int | None = None,
    tok=None,
) -> list[TaskRecord]:
    """Task records of a LongBlocks Parquet file, checked.

    ``family``: ``longblocks_em`` or ``longblocks_f1``. ``teacher_column`` (e.g.
    ``response_Qwen3-Next-80B-A3B``) goes into ``meta["teacher_response"]``. ``limit``: the
    first rows only. ``tok``: when given, ``meta["length"]`` is the prompt's tokens.
    TaskError, naming the file and the row or column, on a missing file or column, an empty
    id, document, question, answer or teacher response, a duplicate id or no rows.
    """
    if family not in LONGBLOCKS:
        raise TaskError(f"{path}: family {family!r} is not one of {', '.join(LONGBLOCKS)}")
    if limit is not None and limit < 1:
        raise TaskError(f"{path}: limit {limit} must be at least 1")
    if not os.path.isfile(path):
        raise TaskError(f"{path}: LongBlocks file not found")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise TaskError(f"{path}: not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    wanted = list(COLUMNS) + ([teacher_column] if teacher_column else [])
    for c in wanted:
        if c not in names:
            raise TaskError(f"{path}: column {c!r} missing (columns: {', '.join(names)})")
    columns = wanted + [c for c in CARRIED if c in names]
    out: list[TaskRecord] = []
    seen: set[str] = set()
    row = 0
    for batch in pf.iter_batches(columns=columns):
        cols = {c: batch.column(j).to_pylist() for j, c in enumerate(columns)}
        for k in range(batch.num_rows):
            if limit is not None and len(out) >= limit:
                break
            rid = cols["id"][k]
            rid = _text(path, row, None, "id", rid if rid is None else str(rid))
            if rid in seen:
                raise TaskError(f"{path}: row {row}: duplicate id {rid!r}")
            seen.add(rid)
            doc, q, a = (_text(path, row, rid, c, cols[c][k]) for c in COLUMNS[1:])
            prompt = TEMPLATE.format(document=doc, question=q)
            meta: dict = {c: cols[c][k] for c in CARRIED if c in cols}
            meta["chars"] = len(prompt)
            if tok is not None:
                meta["length"] = count_tokens(tok, prompt)
            if teacher_column:
                meta["teacher_response"] = _text(
                    path, row, rid, teacher_column, cols[teacher_column][k]
                )
            out.append(TaskRecord(rid, family, prompt, a, meta))
            row += 1
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TaskError(f"{path}: the LongBlocks file has no rows")
    return out
