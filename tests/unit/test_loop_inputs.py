"""`policylong run` refuses a loop it cannot carry out before any screening or training, with a
message naming the field and the numbers."""

from __future__ import annotations

import json

import pytest

from policylong.config import load_config
from policylong.stages import check_loop


def _cfg(tmp_path, n_docs=10, **sets):
    (tmp_path / "corpus").mkdir(exist_ok=True)
    with open(tmp_path / "corpus" / "docs.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": f"d{i}", "text": "word " * 50}) + "\n")
    return load_config(None, [f"workdir={tmp_path}"] + [f"{k}={v}" for k, v in sets.items()])


def test_a_feasible_loop_gives_its_roots_per_stage(tmp_path):
    assert check_loop(_cfg(tmp_path, **{"loop.stages": 3})) == 3  # 10 // 3
    assert check_loop(_cfg(tmp_path, **{"loop.stages": 2, "loop.roots_per_stage": 5})) == 5


@pytest.mark.parametrize(
    "sets,match",
    [
        (
            {"loop.stages": 3, "loop.roots_per_stage": 4},
            r"too few root documents.*stages = 3.*needs 12",
        ),
        ({"loop.stages": 11}, r"10 documents.*too few root documents for loop.stages = 11"),
        ({"loop.stages": 2, "data.root_offset": 9}, r"root_offset = 9: too few"),
        (
            {"loop.tokens_per_stage": 1000, "data.seq_length": 1024, "train.global_batch_size": 8},
            r"loop.tokens_per_stage = 1000 is less than one optimizer step.*8192",
        ),
        ({"parallel.tensor_parallel": 2}, r"does not divide the world size 1"),
    ],
)
def test_infeasible_loops_are_refused_naming_the_field(tmp_path, sets, match):
    with pytest.raises(ValueError, match=match):
        check_loop(_cfg(tmp_path, **sets))


def test_context_parallel_is_refused_for_in_loop_screening(tmp_path):
    with pytest.raises(ValueError, match="parallel.context_parallel = 2"):
        check_loop(_cfg(tmp_path, **{"parallel.context_parallel": 2}), world=2)


def test_unknown_preset_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="entropy .*shipped preset: .*entropylong"):
        load_config(["entropy"])


def test_stage_config_takes_disjoint_roots_and_the_token_budget(tmp_path):
    from policylong.stages import stage_config

    cfg = _cfg(
        tmp_path,
        **{
            "loop.stages": 3,
            "data.root_offset": 1,
            "loop.tokens_per_stage": 5 * 8 * 1024 + 100,
            "data.seq_length": 1024,
            "train.global_batch_size": 8,
        },
    )
    R = check_loop(cfg)
    assert R == 3  # (10 - 1) // 3
    ranges = [
        (c.data.root_offset, c.data.root_offset + c.data.num_roots, c.stage, c.train.train_steps)
        for c in (stage_config(cfg, t, R) for t in range(3))
    ]
    assert ranges == [(1, 4, 0, 5), (4, 7, 1, 5), (7, 10, 2, 5)]
