"""Documents in, passages out: readers (JSONL, Parquet, folders of .txt), chunking, tokenizers.

Every reader yields :class:`Document` and fails with a message naming the file and the line /
row / field at fault: a corpus is never half-read silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from policylong.errors import InputNotFoundError, PolicyLongError

log = logging.getLogger(__name__)


class CorpusError(PolicyLongError, ValueError):
    """A corpus file that cannot be read as documents."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def _check_doc(path: str, where: str, obj, id_field: str, text_field: str) -> Document:
    if not isinstance(obj, dict):
        raise CorpusError(
            f"{path}: {where}: expected an object with '{id_field}' and "
            f"'{text_field}', got {type(obj).__name__}"
        )
    for key in (id_field, text_field):
        if key not in obj:
            raise CorpusError(f"{path}: {where}: missing field '{key}'")
    doc_id, text = obj[id_field], obj[text_field]
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
        raise CorpusError(f"{path}: {where}: field '{id_field}' must be a string")
    if not isinstance(text, str):
        raise CorpusError(f"{path}: {where}: field '{text_field}' must be a string")
    return Document(str(doc_id), text)


def _read_jsonl(path: str, id_field: str, text_field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}: line {lineno}: not UTF-8 ({e.reason} at byte {e.start} of the line)"
                ) from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from e
            yield _check_doc(path, f"line {lineno}", obj, id_field, text_field)


def _read_parquet(path: str, id_field: str, text_field: str) -> Iterator[Document]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    for key in (id_field, text_field):
        if key not in names:
            raise CorpusError(f"{path}: missing column '{key}' (columns: {names})")
    row = 0
    for batch in pf.iter_batches(columns=[id_field, text_field]):
        ids = batch.column(0).to_pylist()
        texts = batch.column(1).to_pylist()
        for doc_id, text in zip(ids, texts):
            yield _check_doc(
                path, f"row {row}", {id_field: doc_id, text_field: text}, id_field, text_field
            )
            row += 1


def _read_text_dir(path: str) -> Iterator[Document]:
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n.endswith(".txt")]
    for fp in sorted(files):
        with open(fp, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{fp}: not UTF-8 ({e.reason} at byte {e.start})") from e
        yield Document(os.path.splitext(os.path.relpath(fp, path))[0], text)


def read_documents(path: str, id_field: str = "id", text_field: str = "text") -> list[Document]:
    """Read every document of a .jsonl / .parquet file or a folder of .txt files.

    Raises CorpusError on a missing path, an unknown format, bad rows, duplicate ids or an
    empty corpus.
    """
    docs, seen = [], set()
    for d in _iter_rows(path, id_field, text_field):
        if d.id in seen:
            raise CorpusError(f"{path}: duplicate document id '{d.id}'")
        seen.add(d.id)
        if d.text.strip():
            docs.append(d)
    if not docs:
        raise CorpusError(f"{path}: the corpus is empty (no document with non-blank text)")
    return docs


def iter_documents(path: str, id_field: str = "id", text_field: str = "text") -> Iterator[Document]:
    """The documents of ``read_documents`` one at a time (blank ones skipped), for corpora that
    do not fit in memory. Repeated ids are not checked here: the passage store's id lookup
    finds repeated passage ids."""
    for d in _iter_rows(path, id_field, text_field):
        if d.text.strip():
            yield d


def _iter_rows(path: str, id_field: str, text_field: str) -> Iterator[Document]:
    if not os.path.exists(path):
        raise CorpusError(f"{path}: corpus not found")
    if os.path.isdir(path):
        it = _read_text_dir(path)
    elif path.endswith(".jsonl") or path.endswith(".json"):
        it = _read_jsonl(path, id_field, text_field)
    elif path.endswith(".parquet"):
        it = _read_parquet(path, id_field, text_field)
    else:
        raise CorpusError(
            f"{path}: unknown corpus format (expected .jsonl, .parquet or a folder of .txt files)"
        )
    return it


# -- tokenizers --------------------------------------------------------------------------------


def load_tokenizer(model_dir: str):
    """The tokenizer of a local model directory, loaded the way the backends use it.

    A folder whose ``tokenizer_config.json`` declares ``PreTrainedTokenizerFast`` is loaded
    from its ``tokenizer.json`` directly (``AutoTokenizer`` routes by model type and would
    give a Qwen2 folder a BPE tokenizer that splits a word-level vocabulary wrongly); anything
    else goes through ``AutoTokenizer`` with ``local_files_only``.
    """
    # third-party and heavy (1-2 s): imported by the processes that tokenize, not by every rank
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not os.path.isdir(model_dir):
        raise InputNotFoundError(f"{model_dir}: model directory not found")
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    if cfg.get("tokenizer_class") == "PreTrainedTokenizerFast":
        tk_file = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(tk_file):
            raise InputNotFoundError(f"{tk_file}: declared by tokenizer_config.json but missing")
        special = {
            k: cfg[k]
            for k in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token")
            if cfg.get(k)
        }
        return PreTrainedTokenizerFast(
            tokenizer_file=tk_file, clean_up_tokenization_spaces=False, **special
        )
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise InputNotFoundError(f"{model_dir}: no loadable tokenizer ({e})") from e


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (documents are joined by the pipeline)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise CorpusError(
            "the tokenizer has no eos token; the pipeline needs one as the chunk separator"
        )
    return int(tokenizer.eos_token_id)


def context_token_id(tokenizer) -> int:
    """The token every screening forward starts with: BOS if the model has one, else EOS
    (Qwen2.5 has no BOS and separates documents with <|endoftext|>)."""
    return int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else eos_id(tokenizer)


# -- chunking ----------------------------------------------------------------------------------

_SENT = re.compile(r"(?<=[.!?])\s+")


def _split_units(text: str) -> list[str]:
    """Paragraphs, then sentences: the boundaries a chunk prefers to end on."""
    units = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if para:
            units.extend(s for s in _SENT.split(para) if s.strip())
    return units


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    num_tokens: int


def chunk_document(doc: Document, tokenizer, max_tokens: int, min_tokens: int = 0) -> list[Passage]:
    """Token-bounded chunks of one document, cut on paragraph / sentence boundaries.

    A document that fits in ``max_tokens`` stays one passage with the document's id; otherwise
    chunks are ``<id>#<k>``. A sentence longer than ``max_tokens`` is cut by tokens.
    """
    n = len(encode(tokenizer, doc.text))
    if n <= max_tokens:
        return [Passage(doc.id, doc.text.strip(), n)] if n >= max(min_tokens, 1) else []
    pieces: list[tuple[str, int]] = []
    for u in _split_units(doc.text):
        ids = encode(tokenizer, u)
        if len(ids) <= max_tokens:
            pieces.append((u, len(ids)))
        else:
            for s in range(0, len(ids), max_tokens):
                part = ids[s : s + max_tokens]
                pieces.append((tokenizer.decode(part), len(part)))
    chunks: list[tuple[list[str], int]] = []
    cur: list[str] = []
    cur_n = 0
    for text, m in pieces:
        if cur and cur_n + m > max_tokens:
            chunks.append((cur, cur_n))
            cur, cur_n = [], 0
        cur.append(text)
        cur_n += m
    if cur:
        if chunks and cur_n < min_tokens and chunks[-1][1] + cur_n <= max_tokens:
            chunks[-1] = (chunks[-1][0] + cur, chunks[-1][1] + cur_n)
        else:
            chunks.append((cur, cur_n))
    out = []
    for k, (parts, _) in enumerate(chunks):
        text = " ".join(parts)
        m = len(encode(tokenizer, text))  # joining can merge tokens: count what is stored
        if m >= max(min_tokens, 1):
            out.append(Passage(f"{doc.id}#{k}", text, m))
    return out
