"""SIGKILL at seeded moments, then a rerun: the same bytes as an uninterrupted run.

The CI-sized slice of ``benchmarks/kill_anywhere.py`` (same code): its first command,
``policylong synth``, forked from this process and SIGKILLed at 4 seeded moments of a reference
run; each rerun must give the reference's corpus byte for byte and leave no ``.partial`` or
``.lock`` beside it. The full chain (index, screen, train, run; 20 points) is the benchmark's.
"""

from __future__ import annotations

import importlib.util
import os

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kill_anywhere.py")


def _bench():
    spec = importlib.util.spec_from_file_location("kill_anywhere", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_synth_killed_anywhere_reruns_to_the_same_bytes(tmp_path):
    ka = _bench()
    res = ka.kill_anywhere(str(tmp_path), points=4, seed=0, steps=1)
    assert res["files"] == 3  # docs, passages, ground truth
    assert [p["diff"] for p in res["points"]] == [[]] * 4, res
    assert res["all_identical"]
    assert sum(p["killed"] == "synth" for p in res["points"]) >= 2  # kills landed inside synth
    assert sorted(os.listdir(tmp_path)) == ["ref"]  # each point's workdir is removed
    assert sorted(os.listdir(tmp_path / "ref")) == ["corpus"]  # no corpus.partial / .lock
