"""Readers, chunking and the tokenizer loader: bad input names the file and the place."""

from __future__ import annotations

import json
import os

import pytest

from policylong.corpus import (
    CorpusError,
    Document,
    chunk_document,
    encode,
    load_tokenizer,
    read_documents,
)


def write(path, text_or_bytes):
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    with open(path, mode) as f:
        f.write(text_or_bytes)
    return str(path)


def test_jsonl_parquet_and_text_dir_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [{"id": "a", "text": "one two ."}, {"id": "b", "text": "three ."}]
    j = write(tmp_path / "d.jsonl", "".join(json.dumps(d) + "\n" for d in docs) + "\n")
    p = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one two .", "three ."]}), p)
    os.makedirs(tmp_path / "txt" / "sub")
    write(tmp_path / "txt" / "a.txt", "one two .")
    write(tmp_path / "txt" / "sub" / "b.txt", "three .")
    want = [Document("a", "one two ."), Document("b", "three .")]
    assert read_documents(j) == want
    assert read_documents(p) == want
    assert read_documents(str(tmp_path / "txt")) == [
        Document("a", "one two ."),
        Document("sub/b", "three ."),
    ]


def test_custom_fields(tmp_path):
    j = write(tmp_path / "d.jsonl", json.dumps({"doc": 7, "body": "x y"}) + "\n")
    assert read_documents(j, id_field="doc", text_field="body") == [Document("7", "x y")]


@pytest.mark.parametrize(
    "content,match",
    [
        (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "bad \xff\xfe"}\n', r"line 2: not UTF-8"),
        (b'{"id": "a", "text": "ok"}\n{"id": "b"\n', r"line 2: invalid JSON"),
        (b'{"id": "a"}\n', r"line 1: missing field 'text'"),
        (b'{"id": "a", "text": 3}\n', r"field 'text' must be a string"),
        (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', r"duplicate document id 'a'"),
        (b"\n\n", r"empty"),
        (b'{"id": "a", "text": "   "}\n', r"empty"),
    ],
)
def test_bad_jsonl(tmp_path, content, match):
    p = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(CorpusError, match=match) as e:
        read_documents(p)
    assert "bad.jsonl" in str(e.value)


def test_missing_unknown_and_bad_txt(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_documents(str(tmp_path / "nope.jsonl"))
    with pytest.raises(CorpusError, match="unknown corpus format"):
        read_documents(write(tmp_path / "x.csv", "a,b"))
    os.makedirs(tmp_path / "t")
    write(tmp_path / "t" / "bad.txt", b"ok \xc3\x28")
    with pytest.raises(CorpusError, match=r"bad.txt: not UTF-8"):
        read_documents(str(tmp_path / "t"))
    pq = write(tmp_path / "x.parquet", b"not parquet")
    with pytest.raises(CorpusError, match="x.parquet"):
        read_documents(pq)


def test_chunking_respects_bounds_and_sentences(tokenizer):
    sents = [" ".join(["nobody was in a hurry ."] * k) for k in (1, 3, 2, 5, 1)]
    text = "\n\n".join(sents)
    doc = Document("d", text)
    chunks = chunk_document(doc, tokenizer, max_tokens=24)
    assert len(chunks) > 1
    for c in chunks:
        assert c.num_tokens == len(encode(tokenizer, c.text)) <= 24
        assert c.text.endswith(".")  # cut on sentence boundaries
        assert c.id.startswith("d#")
    # nothing lost, nothing duplicated
    assert sum(c.num_tokens for c in chunks) == len(encode(tokenizer, text))
    # a short document stays whole, with its own id
    assert chunk_document(Document("s", "nobody was in a hurry ."), tokenizer, 24)[0].id == "s"


def test_overlong_sentence_is_cut_by_tokens(tokenizer):
    doc = Document("d", " ".join(["hurry"] * 50) + " .")
    chunks = chunk_document(doc, tokenizer, max_tokens=16)
    assert all(c.num_tokens <= 16 for c in chunks)
    assert sum(c.num_tokens for c in chunks) == 51


def test_word_level_tokenizer_round_trip(tokenizer_dir, tokenizer):
    """The loader honours tokenizer_config.json's declared class: every word one id, decoded
    back verbatim (AutoTokenizer would route a Qwen2 folder to a BPE tokenizer)."""
    from policylong import synthetic as syn

    lang = syn.build_language()
    ent, val = lang.entities[5], lang.values["code"][7]
    text = f"from the mill ledger . the access code of {ent} is {val} ."
    ids = encode(tokenizer, text)
    assert len(ids) == len(text.split())
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert encode(tokenizer, "zzzunknownword")[0] == tokenizer.unk_token_id
    assert tokenizer.bos_token == "<bos>" and tokenizer.eos_token == "<eos>"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(os.path.join(tokenizer_dir, "missing"))
