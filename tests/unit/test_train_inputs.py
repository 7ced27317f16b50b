"""Training-stage inputs that must fail before any process group or training step: bad
layouts, stage folders that do not match their manifest, sequence lengths the data cannot give,
checkpoints saved for another architecture. All in-process (no torchrun needed)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from policylong.config import ParallelConfig, load_config
from policylong.datasets import StageDatasetError, commit, write_stage_dataset
from policylong.megatron_ext import model as M
from policylong.megatron_ext import train as T


@pytest.fixture()
def stage(tmp_path):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(5, 1500, size=48).tolist() for _ in range(10)]
    part, final = str(tmp_path / "s.partial"), str(tmp_path / "s")
    os.makedirs(part)
    write_stage_dataset(part, seqs, [{"root": str(i)} for i in range(10)], {"eod": 3}, 1519, 48)
    commit(part, final)
    return final


def cfg(**over):
    sets = ["screening.screen_length=16", "data.seq_length=48", "train.global_batch_size=4"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, sets)


def test_layout_that_does_not_divide_the_world(stage, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"TP×PP×CP = 2×2×1 = 4 does not divide the world size 6"):
        T.train_stage(
            cfg(**{"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2}),
            [stage],
            "embedded",
            "unused",
        )


def test_global_batch_not_divisible(stage, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(T.TrainError, match="global_batch_size = 4 is not a multiple"):
        T.train_stage(cfg(), [stage], "embedded", "unused")


def test_stage_sha_mismatch(stage, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with open(os.path.join(stage, "data.bin"), "r+b") as f:
        f.seek(10)
        f.write(b"\x07")
    with pytest.raises(StageDatasetError, match=r"data.bin: sha256 .* does not match manifest"):
        T.train_stage(cfg(), [stage], "embedded", "unused")


def test_seq_length_beyond_the_data(stage, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(T.TrainError, match="data.seq_length = 64 exceeds the dataset's"):
        T.train_stage(cfg(**{"data.seq_length": 64}), [stage], "embedded", "unused")


def test_checkpoint_for_another_architecture(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    from policylong.paths import resolve_model_path

    hf = M.read_hf_config(resolve_model_path("embedded"))
    other = dict(hf, hidden_size=256, num_hidden_layers=4)
    ck = tmp_path / "ck"
    T.write_meta(str(ck), other, M.ModelOptions(), None)
    with pytest.raises(T.TrainError, match="hidden_size: checkpoint 256 vs config 128"):
        T.train_stage(cfg(), [stage], "embedded", str(ck))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="parallel.tensor_parallel"):
        ParallelConfig(tensor_parallel=0)
    with pytest.raises(ValueError, match="train.global_batch_size"):
        cfg(**{"train.micro_batch_size": 3})
    with pytest.raises(ValueError, match="train.lr_decay_style"):
        cfg(**{"train.lr_decay_style": "step"})
    with pytest.raises(ValueError, match="train.min_lr"):
        cfg(**{"train.lr": 1e-5, "train.min_lr": 1e-4})


def test_unsupported_hf_models_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        M.read_hf_config(str(tmp_path))
    c = {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        M._rope(c)


def test_export_config_carries_the_trained_rope():
    c = {"model_type": "qwen2", "rope_theta": 1000000.0}
    out = M.hf_config_for_export(c, M.ModelOptions(rotary_base=5e6, rope_scaling_factor=4.0))
    assert out["rope_theta"] == 5e6 and out["rope_scaling"] == {
        "rope_type": "linear",
        "factor": 4.0,
    }
    c5 = {"model_type": "qwen2", "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}
    out5 = M.hf_config_for_export(c5, M.ModelOptions(rotary_base=1e6))
    assert out5["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
    assert M._rope(out5) == (1e6, None) and M._rope(out) == (5e6, 4.0)


def test_flops_per_token_is_six_per_matmul_weight():
    """At seq length 0 the estimate is 6 FLOPs per weight of every matmul (q, k, v, o, MLP and
    the LM head) of the actual HF model; the attention term adds 12·layers·q·hd per token of
    context over the full matrix, half of that for causal kernels."""
    import torch
    from transformers import AutoModelForCausalLM

    from policylong.paths import resolve_model_path

    path = resolve_model_path("embedded")
    c = M.read_hf_config(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n = sum(
        p.numel()
        for name, p in hf.named_parameters()
        if p.dim() == 2 and "embed_tokens" not in name
    )
    n += c["vocab_size"] * c["hidden_size"]  # the tied head is a matmul too
    assert T.flops_per_token(c, 0) == 6 * n
    full = T.flops_per_token(c, 100, causal=False) - T.flops_per_token(c, 0)
    assert full == 12 * 100 * c["num_hidden_layers"] * c["num_attention_heads"] * M.head_dim(c)
    assert T.flops_per_token(c, 100) - T.flops_per_token(c, 0) == full / 2  # causal half


def test_loop_config_validation_and_stage_ranges():
    from policylong.stages import stage_config

    with pytest.raises(ValueError, match="loop.stages"):
        cfg(**{"loop.stages": 0})
    with pytest.raises(ValueError, match="loop.preset"):
        cfg(**{"loop.preset": "a/b"})
    c = cfg(**{"data.root_offset": 5, "loop.tokens_per_stage": 4 * 48 * 3})
    s1 = stage_config(c, 1, 10)
    assert (s1.stage, s1.data.root_offset, s1.data.num_roots) == (1, 15, 10)
    assert s1.train.train_steps == 3  # 576 tokens / (4 sequences × 48 tokens)
    assert c.hash() != s1.hash()  # each stage's dataset has its own config hash


def test_a_checkpoint_keeps_the_rope_base_it_was_trained_with(tmp_path):
    """Commands that rebuild a trained model without repeating train.rotary_base (report, the
    next stage's train --from) get the checkpoint's RoPE settings, not its HF config's; an
    explicit setting still wins."""
    import json

    from policylong.config import load_config
    from policylong.megatron_ext.train import META, model_options

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / META).write_text(
        json.dumps(
            {"hf_config": {}, "model_options": {"rotary_base": 5e4, "rope_scaling_factor": 2.0}}
        )
    )
    plain = load_config(None, [])
    assert model_options(plain).rotary_base is None
    o = model_options(plain, str(ck))
    assert (o.rotary_base, o.rope_scaling_factor) == (5e4, 2.0)
    assert model_options(plain, f"{ck}@4").rotary_base == 5e4
    assert model_options(load_config(None, ["train.rotary_base=1e6"]), str(ck)).rotary_base == 1e6
