"""Bad input stops with a message that names the file / field, and writes nothing partial."""

from __future__ import annotations

import json
import os

import pytest

from policylong.cli import main
from policylong.passage_store import write_lookup, write_store
from policylong.retrieval import IndexError_, PassageIndex
from policylong.screening import pipeline as pl


def test_cli_names_the_bad_field(capsys, caplog):
    assert main(["screen", "--set", "screening.tau_pos=1.5", "--out", "/tmp/x"]) == 2
    assert "screening.tau_pos" in caplog.text
    caplog.clear()
    assert main(["screen", "--set", "data.seq_length=100"]) == 2
    assert "data.seq_length" in caplog.text


def test_cli_missing_model_dir(tmp_path, caplog):
    rc = main(
        [
            "screen",
            "--workdir",
            str(tmp_path),
            "--model",
            str(tmp_path / "no_model"),
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert rc == 2
    assert "no_model: model directory not found" in caplog.text
    assert not os.path.exists(tmp_path / "s")


def test_cli_missing_and_empty_corpus(tmp_path, tokenizer_dir, caplog):
    base = ["index", "--workdir", str(tmp_path), "--set", f"model.path={tokenizer_dir}"]
    assert main(base) == 2
    assert "passages.jsonl: corpus not found" in caplog.text
    os.makedirs(tmp_path / "corpus")
    (tmp_path / "corpus" / "passages.jsonl").write_text("\n")
    caplog.clear()
    assert main(base) == 2
    assert "passages.jsonl: the corpus is empty" in caplog.text
    assert not os.path.exists(tmp_path / "index")


def test_corrupt_index(tmp_path, index):
    d = str(tmp_path / "index")
    index.save(d)
    PassageIndex.load(d)  # intact
    with open(os.path.join(d, "faiss.index"), "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff\xff")
    with pytest.raises(IndexError_, match="faiss.index: sha256 .* corrupt"):
        PassageIndex.load(d)
    # a store that no longer matches the vectors, even with verification off
    store = os.path.join(d, "passages.arrow")
    write_store(store, [*zip(index.ids, index.texts), ("extra", "x")])
    write_lookup(store, os.path.join(d, "passages.ids.arrow"))
    with pytest.raises(IndexError_, match="holds .* vectors but the store"):
        PassageIndex.load(d, verify=False)
    os.remove(os.path.join(d, "meta.json"))
    with pytest.raises(IndexError_, match="meta.json is missing"):
        PassageIndex.load(d)
    with pytest.raises(IndexError_, match="no passage index"):
        PassageIndex.load(str(tmp_path / "nothing"))


def test_documents_shorter_than_the_query_window(
    tmp_path, make_cfg, copy_model, index, embedder, synth_corpus
):
    docs = tmp_path / "short.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "text": "nobody was in a hurry ."}) + "\n" for i in range(3)
        )
    )
    cfg = make_cfg(tmp_path, **{"corpus.docs": str(docs)})
    with pytest.raises(
        pl.ScreeningError,
        match=r"short.jsonl: no root document has the 33 tokens screening needs "
        r"\(a query window, screening.window=12: 25; a position with context, "
        r"screening.min_context=32: 33",
    ):
        pl.screen_stage(cfg, copy_model, index, embedder, str(tmp_path / "s"), progress=False)
    assert not os.path.exists(tmp_path / "s")


def test_too_few_roots(tmp_path, make_cfg, copy_model, index, embedder):
    cfg = make_cfg(tmp_path, **{"data.num_roots": 50})
    with pytest.raises(pl.ScreeningError, match="needs 50 documents but the corpus has 12"):
        pl.screen_stage(cfg, copy_model, index, embedder, str(tmp_path / "s"), progress=False)


def test_embedder_index_mismatch(tmp_path, make_cfg, copy_model, index):
    from conftest import HashingEmbedder

    with pytest.raises(pl.ScreeningError, match="128-d vectors but the index"):
        pl.Screener(make_cfg(tmp_path), copy_model, index, HashingEmbedder(128))


def test_short_documents_are_skipped_and_counted(
    tmp_path, make_cfg, copy_model, index, embedder, synth_corpus
):
    docs = tmp_path / "mixed.jsonl"
    lines = open(os.path.join(synth_corpus, "docs.jsonl")).read().splitlines()[:4]
    lines.append(json.dumps({"id": "tiny", "text": "nobody was in a hurry ."}))
    docs.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(tmp_path, **{"corpus.docs": str(docs)})
    m = pl.screen_stage(cfg, copy_model, index, embedder, str(tmp_path / "s"), progress=False)
    assert m["stats"]["skipped"]["too_short"] == 1
    assert m["stats"]["roots"] == 5


# -- the CLI's error contract and output folders (in process: no model is loaded) -------------


def _tree(d) -> dict:
    """relative path -> file bytes under ``d``: what a refused command must leave as it was."""
    out = {}
    for root, _, files in os.walk(d):
        for n in files:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["synth", "--out", "x", "--roots", "0"], "argument --roots: 0: must be an integer > 0"),
        (["synth", "--out", "x", "--seed", "-1"], "argument --seed: -1: must be an integer >= 0"),
        (
            ["eval", "--out", "x", "--lengths", "512", "0"],
            "argument --lengths: 0: must be an integer > 0",
        ),
        (["run", "--stages", "0"], "argument --stages: 0: must be an integer > 0"),
        (
            ["eval-tasks", "--model", "m", "--out", "x", "--n", "zero"],
            "argument --n: 'zero': not an integer",
        ),
    ],
)
def test_cli_numbers_checked_at_parse_time(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_cli_config_errors_name_their_source(tmp_path, caplog):
    good = tmp_path / "good.yaml"
    good.write_text("screening:\n  percentile: 5\n")
    assert main(["index", "--config", str(good), "--set", "screening.nope=1"]) == 2
    assert "--set 'screening.nope=1': unknown config field 'screening.nope'" in caplog.text
    assert "good.yaml" not in caplog.text  # the YAML file is not blamed for the override
    caplog.clear()
    assert main(["index", "--set", "nosuch=1"]) == 2
    assert "--set 'nosuch=1': unknown config field 'nosuch'" in caplog.text
    caplog.clear()
    listy = tmp_path / "list.yaml"
    listy.write_text("- screening\n- data\n")
    assert main(["index", "--config", str(listy)]) == 2
    assert "list.yaml: a config file must be a mapping of sections" in caplog.text
    caplog.clear()
    assert main(["index", "--set", "seed=-1"]) == 2
    assert "config field 'seed' = -1: must be >= 0" in caplog.text


def test_cli_user_errors_one_line_others_propagate(monkeypatch, caplog):
    """PolicyLongError and path errors -> one line, exit 2 (-v: with the traceback); Ctrl-C ->
    one line saying a rerun resumes, exit 130; anything else (CUDA OOM, NCCL, a bug) keeps
    its traceback; the process group is torn down on every path."""
    import errno

    from policylong import cli
    from policylong.datasets import StageDatasetError

    torn = []
    monkeypatch.setattr(cli, "_teardown", lambda: torn.append(1))

    def raising(exc):
        def cmd(args):
            raise exc

        return cmd

    cases = [
        (StageDatasetError("s/manifest.json: missing field 'x'"), 2, "s/manifest.json: missing"),
        (OSError(errno.ENOSPC, "No space left on device", "/w/data.bin"), 2, "/w/data.bin: No sp"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/x"), 2, "/ro/x: Permission"),
        (KeyboardInterrupt(), 130, "interrupted: screened batches are kept in OUT.partial/"),
    ]
    for exc, rc, msg in cases:
        caplog.clear()
        monkeypatch.setattr(cli, "cmd_screen", raising(exc))
        assert main(["screen"]) == rc
        assert msg in caplog.text and len(caplog.records) == 1
        assert caplog.records[0].exc_info is None
    caplog.clear()
    monkeypatch.setattr(cli, "cmd_screen", raising(StageDatasetError("bad stage")))
    assert main(["-v", "screen"]) == 2
    assert caplog.records[0].exc_info is not None  # -v: the traceback too
    for exc in (
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        ValueError("an internal bug"),
        OSError(errno.EIO, "Input/output error"),
    ):
        monkeypatch.setattr(cli, "cmd_screen", raising(exc))
        with pytest.raises(type(exc)):
            main(["screen"])
    assert len(torn) == 8  # 4 one-line cases, -v, 3 propagated


def test_synth_output_folder_contract(tmp_path, caplog):
    """synth refuses a folder of other files and an existing corpus without --overwrite; with
    it, the corpus is replaced whole; under a file or in a read-only place: one line."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "docs.jsonl").write_text('{"id": "a", "text": "my own document"}\n')
    before = _tree(mine)
    assert main(["synth", "--out", str(mine), "--roots", "2", "--overwrite"]) == 2
    assert "mine: holds other files (docs.jsonl), not a synthetic corpus" in caplog.text
    assert _tree(mine) == before

    out = str(tmp_path / "c")
    assert main(["synth", "--out", out, "--roots", "2", "--seed", "1"]) == 0
    first = _tree(out)
    assert sorted(first) == ["docs.jsonl", "ground_truth.jsonl", "passages.jsonl"]
    caplog.clear()
    assert main(["synth", "--out", out, "--roots", "2"]) == 2
    assert "c: already holds a synthetic corpus; pass --overwrite" in caplog.text
    assert _tree(out) == first
    assert main(["synth", "--out", out, "--roots", "3", "--seed", "1", "--overwrite"]) == 0
    assert _tree(out) != first and len(_tree(out)["docs.jsonl"].splitlines()) == 3
    assert sorted(os.listdir(tmp_path)) == ["c", "mine"]  # no .partial, .old or .lock left

    caplog.clear()
    assert main(["synth", "--out", str(mine / "docs.jsonl" / "sub"), "--roots", "2"]) == 2
    assert "docs.jsonl is a file, not a folder" in caplog.text


def test_read_only_output_is_one_line(tmp_path, monkeypatch, caplog):
    from policylong import outputs

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: answer as the kernel would for a user
        real = os.access
        monkeypatch.setattr(
            outputs.os, "access", lambda p, m: False if str(p) == str(ro) else real(p, m)
        )
    assert main(["synth", "--out", str(ro / "c"), "--roots", "2"]) == 2
    assert f"{ro}/c: cannot write here, {ro} is not writable" in caplog.text
    assert os.listdir(ro) == []


def test_foreign_folders_refused_before_any_work(tmp_path, caplog):
    """train --to, screen --out (even with --overwrite), demo/report workdirs: a folder (or
    file) that is not the command's output is refused and left as it was; an existing stage
    survives an --overwrite run whose corpus is missing."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    argv = ["train", "--stage-dir", "s", "--from", "embedded", "--to", str(mine)]
    assert main(argv) == 2
    assert "mine: holds other files (thesis.tex), not a PolicyLong Megatron checkpoint" in (
        caplog.text
    )
    caplog.clear()
    assert main(["screen", "--workdir", str(tmp_path), "--out", str(mine), "--overwrite"]) == 2
    assert "mine: holds other files (thesis.tex), not a stage dataset" in caplog.text
    assert _tree(mine) == {"thesis.tex": b"years of work"}

    stage = tmp_path / "stage"
    stage.mkdir()
    for n in ("manifest.json", "data.bin", "data.idx"):
        (stage / n).write_text(n)
    caplog.clear()
    argv = ["screen", "--workdir", str(tmp_path), "--out", str(stage), "--overwrite"]
    assert main(argv) == 2
    assert "corpus/docs.jsonl: corpus not found (corpus.docs)" in caplog.text
    assert sorted(_tree(stage)) == ["data.bin", "data.idx", "manifest.json"]

    afile = tmp_path / "wd"
    afile.write_text("not a folder")
    for cmd in ("demo", "report", "run"):
        caplog.clear()
        assert main([cmd, "--workdir", str(afile)]) == 2, cmd
        assert "wd: the workdir is a file, not a folder" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["mine", "stage", "wd"]


def test_one_writer_per_output_folder(tmp_path, caplog):
    """A second writer of a folder is refused naming the holder; the lock file goes with the
    first writer."""
    from policylong.errors import OutputError
    from policylong.outputs import output_lock

    out = str(tmp_path / "runs" / "policylong")
    with output_lock(out):
        assert open(out + ".lock").read() == str(os.getpid())
        with pytest.raises(OutputError, match=rf"another process \(pid {os.getpid()}\)"):
            with output_lock(out):
                pass
        assert main(["run", "--workdir", str(tmp_path), "--config", "policylong"]) == 2
        assert f"policylong: another process (pid {os.getpid()}) is writing it" in caplog.text
    assert os.listdir(tmp_path / "runs") == []


def test_stage_lock_waits_and_leaves_no_file(tmp_path):
    """The loop's per-stage lock: a second screener waits for the first (it may find the stage
    done), and no ``stage_N.lock`` stays beside a finished stage."""
    import threading

    from policylong.stages import _stage_lock

    stage = str(tmp_path / "stage_0")
    order = []
    with _stage_lock(stage):
        assert os.path.isfile(stage + ".lock")

        def second():
            with _stage_lock(stage):
                order.append("second")

        th = threading.Thread(target=second)
        th.start()
        th.join(0.5)
        assert th.is_alive()  # waiting on the first holder
        order.append("first")
    th.join(10)
    assert order == ["first", "second"]
    assert os.listdir(tmp_path) == []


def test_output_kinds_and_what_a_killed_run_leaves(tmp_path):
    """A kind is recognised by the files its command writes; what a run killed before its
    marker file leaves (a checkpoint's hf/ and policylong.json.tmp) is still its own; one
    foreign file makes the folder foreign, named in the message."""
    from policylong.errors import OutputError
    from policylong.outputs import check_output, kind_of

    ck = tmp_path / "ck"
    (ck / "hf").mkdir(parents=True)
    (ck / "policylong.json.tmp").write_text("{")
    assert kind_of(str(ck)) == "checkpoint"
    assert check_output(str(ck), "checkpoint", resume=True) is True
    (ck / "notes.txt").write_text("mine")
    assert kind_of(str(ck)) is None
    with pytest.raises(OutputError, match=r"holds other files \(hf/, notes.txt, policylong.js"):
        check_output(str(ck), "checkpoint", resume=True)
    (tmp_path / "empty").mkdir()
    assert check_output(str(tmp_path / "empty"), "stage") is False
    assert check_output(str(tmp_path / "new" / "deeper"), "stage") is False
    assert sorted(os.listdir(tmp_path)) == ["ck", "empty"]  # checking creates nothing
