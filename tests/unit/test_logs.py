"""metrics.jsonl and TensorBoard scalars of the training loops (logs.MetricsLog)."""

from __future__ import annotations

import json

import pytest

from policylong.logs import MetricsLog


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_resume_drops_unsaved_steps_in_jsonl_and_tensorboard(tmp_path):
    """A run logs steps 1-3, is killed after saving step 2, and resumes: metrics.jsonl keeps
    steps 1-2 byte for byte then gets the new step 3; TensorBoard (read back with its own
    EventAccumulator) shows one value per step, the resumed run's at step 3."""
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    path, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    m = MetricsLog(str(path), str(tb), 0)
    for s in (1, 2, 3):
        m.write({"step": s, "loss": 1.0 / s, "lr": 0.1, "note": "x", "ok": True})
    m.close()
    first_two = path.read_text().splitlines()[:2]
    m = MetricsLog(str(path), str(tb), 2)
    assert path.read_text().splitlines() == first_two
    m.write({"step": 3, "loss": 7.0, "lr": 0.1})
    m.close()
    assert [r["loss"] for r in _rows(path)] == [1.0, 0.5, 7.0]
    acc = ea_mod.EventAccumulator(str(tb))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]  # numbers only, not str / bool
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(1, 1.0), (2, 0.5), (3, 7.0)]


def test_jsonl_only_without_a_tensorboard_folder(tmp_path):
    path = tmp_path / "m.jsonl"
    m = MetricsLog(str(path), None, 0)
    m.write({"step": 1, "loss": 2.0})
    m.close()
    assert _rows(path) == [{"step": 1, "loss": 2.0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]
