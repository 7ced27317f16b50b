"""`policylong align` refuses bad input before any model work, naming the value, and writes
nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from policylong.align.loop import plan_align
from policylong.align.rollout import AlignError
from policylong.config import load_config
from policylong.paths import embedded_model_dir


def _cfg(tmp_path, *sets):
    return load_config(
        None, [f"workdir={tmp_path / 'w'}", "align.num_tasks=4", "align.task_length=64", *sets]
    )


def _refused(tmp_path, match, *sets):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(AlignError, match=match):
        plan_align(_cfg(tmp_path, *sets))
    assert not (tmp_path / "w").exists()  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _copy_model(tmp_path, name):
    out = tmp_path / name
    shutil.copytree(embedded_model_dir(), out)
    return out


def test_teacher_with_another_tokenizer(tmp_path):
    t = _copy_model(tmp_path, "other_tok")
    tj = json.loads((t / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (t / "tokenizer.json").write_text(json.dumps(tj))
    _refused(
        tmp_path,
        f"align.teacher: {t} has another tokenizer than the student embedded",
        f"align.teacher={t}",
        "align.teacher_coef=0.1",
    )


def test_group_of_one_for_a_group_method(tmp_path):
    with pytest.raises(ValueError, match="align.group_size.*G >= 2"):
        _cfg(tmp_path, "align.group_size=1")
    assert not (tmp_path / "w").exists()


def test_unknown_task_family(tmp_path):
    _refused(tmp_path, "align.tasks: unknown task family 'summary'", "align.tasks=lookup,summary")


def test_unknown_task_in_a_task_file_and_empty_file(tmp_path):
    f = tmp_path / "tasks.jsonl"
    f.write_text(json.dumps({"id": "1", "task": "sum", "prompt": "x", "answer": "y"}) + "\n")
    _refused(tmp_path, "tasks.jsonl:1 field 'task': unknown task family 'sum'",
             f"align.task_file={f}")  # fmt: skip
    f.write_text("\n")
    _refused(tmp_path, "tasks.jsonl: the task file has no records", f"align.task_file={f}")


def test_prompt_longer_than_the_window(tmp_path):
    f = tmp_path / "tasks.jsonl"
    long = " ".join(["the weather was cold that day ."] * 700)  # ~4,900 tokens > 4,096
    f.write_text(json.dumps({"id": "long-1", "task": "lookup", "prompt": long, "answer": "v"}))
    _refused(
        tmp_path,
        "task 'long-1': prompt of 4901 tokens \\+ align.max_new_tokens=1024 exceeds the "
        "model's window of 4096 tokens",
        f"align.task_file={f}",
    )


def test_student_of_another_architecture_than_the_run(tmp_path):
    """The run folder holds a checkpoint of another model than model.path."""
    ckpt = tmp_path / "w" / "align" / "grpo" / "ckpt"
    os.makedirs(ckpt)
    cfg = json.loads((Path(embedded_model_dir()) / "config.json").read_text())
    meta = {"hf_config": {**cfg, "hidden_size": 256}, "model_options": {}}
    (ckpt / "policylong.json").write_text(json.dumps(meta))
    with pytest.raises(AlignError, match="hidden_size: checkpoint 256 vs config 128"):
        plan_align(_cfg(tmp_path))
    assert sorted(os.listdir(tmp_path / "w" / "align" / "grpo")) == ["ckpt"]


def test_rerun_with_other_inputs_is_refused(tmp_path):
    """A run folder whose align.json records other inputs (here the seed) is not resumed."""
    out = tmp_path / "w" / "align" / "grpo"
    os.makedirs(out)
    plan = plan_align(_cfg(tmp_path))
    (out / "align.json").write_text(json.dumps(plan["fingerprint"]))
    plan_align(_cfg(tmp_path, "align.steps=7"))  # steps may change: the run is extended
    with pytest.raises(AlignError, match="align.lr: 1e-06 -> 0.001"):
        plan_align(_cfg(tmp_path, "align.lr=1e-3"))
    with pytest.raises(AlignError, match="seed: 1234 -> 9"):
        plan_align(_cfg(tmp_path, "seed=9"))
