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
from policylong.megatron_ext import checkpointing as C
from policylong.megatron_ext import model as M
from policylong.megatron_ext import step as S
from policylong.megatron_ext import train as T
from policylong.megatron_ext.plan import StagePlan, plan_stage


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
    with pytest.raises(C.TrainError, match="global_batch_size = 4 is not a multiple"):
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
    with pytest.raises(C.TrainError, match="data.seq_length = 64 exceeds the dataset's"):
        T.train_stage(cfg(**{"data.seq_length": 64}), [stage], "embedded", "unused")


def test_checkpoint_for_another_architecture(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    from policylong.paths import resolve_model_path

    hf = M.read_hf_config(resolve_model_path("embedded"))
    other = dict(hf, hidden_size=256, num_hidden_layers=4)
    ck = tmp_path / "ck"
    C.write_meta(str(ck), other, M.ModelOptions(), None)
    with pytest.raises(C.TrainError, match="hidden_size: checkpoint 256 vs config 128"):
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


@pytest.mark.parametrize(
    "model_type,extra,field",
    [
        ("gemma3", {}, "model_type 'gemma3' is the multimodal"),
        ("gemma3_text", {"final_logit_softcapping": 30.0}, "final_logit_softcapping = 30.0"),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping = 50.0"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma3_text", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
        ("gemma3_text", {"attention_bias": True}, "attention_bias = true"),
        ("gemma3_text", {"layer_types": ["chunked_attention"] * 2}, "chunked_attention"),
        ("qwen3", {"use_sliding_window": True}, "use_sliding_window = true"),
        ("qwen3", {"attention_bias": True}, "attention_bias = true"),
    ],
)
def test_inexpressible_qwen3_and_gemma3_settings_are_refused(tmp_path, model_type, extra, field):
    """What megatron-core cannot compute exactly is refused before any model is built, naming
    the field; the same config without it is accepted."""
    base = {"model_type": model_type, "num_hidden_layers": 2}
    if model_type != "gemma3":
        (tmp_path / "config.json").write_text(json.dumps(base))
        M.read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
    with pytest.raises(ValueError, match=field):
        M.read_hf_config(str(tmp_path))


def test_gemma3_rope_and_layer_kinds_from_either_config_spelling():
    """transformers 5 writes rope_parameters per layer type; hub configs give rope_theta,
    rope_local_base_freq and sliding_window_pattern. Both give the same layers and bases."""
    new = {
        "model_type": "gemma3_text",
        "num_hidden_layers": 6,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }
    old = {
        "model_type": "gemma3_text",
        "num_hidden_layers": 6,
        "sliding_window_pattern": 6,
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }
    for c in (new, old):
        assert M.gemma3_layer_types(c) == new["layer_types"]
        assert M.gemma3_ropes(c) == ((1e4, None), (1e6, 8.0))
        assert M._rope(c) == (1e6, 8.0)  # the global layers' (what model.rotary_base sets)
        assert M.tied(c) and M.head_dim(c) == 256  # transformers' Gemma 3 defaults
        out = M.hf_config_for_export(c, M.ModelOptions(rotary_base=5e6))
        assert M.gemma3_ropes(out) == ((1e4, None), (5e6, 8.0))
        assert M.hf_config_for_export(c, M.ModelOptions()) == c
    with pytest.raises(ValueError, match="train.layer_spec = te is not supported"):
        M._layer_spec({**new, "num_hidden_layers": 6}, M.ModelOptions(spec="te"))


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
    assert S.flops_per_token(c, 0) == 6 * n
    full = S.flops_per_token(c, 100, causal=False) - S.flops_per_token(c, 0)
    assert full == 12 * 100 * c["num_hidden_layers"] * c["num_attention_heads"] * M.head_dim(c)
    assert S.flops_per_token(c, 100) - S.flops_per_token(c, 0) == full / 2  # causal half


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
    from policylong.megatron_ext.checkpointing import META, model_options

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


DRY_RUN_KEYS = [
    "world_size",
    "tensor_parallel",
    "pipeline_parallel",
    "context_parallel",
    "data_parallel",
    "micro_batches_per_step",
    "seq_length",
    "tokens_per_rank_per_micro_batch",
    "train_steps",
    "tokens_per_step",
    "sequences",
    "start",
    "resume_from_step",
    "model",
    "model_options",
]
"""What `policylong train --dry-run` prints; the launch scripts and their test read it."""


def test_stage_plan_fields_and_the_dry_run_json(stage, tmp_path, capsys):
    """``plan_stage`` returns a frozen ``StagePlan``: the layout (TP 2 × DP 2 on 4 ranks, one
    micro-batch of 2 per rank and step), steps from the data (10 sequences // 4), the start
    model, and the checked inputs, which the dry run's JSON leaves out; the CLI prints
    exactly ``summary()``."""
    import dataclasses

    from policylong.cli import main
    from policylong.paths import resolve_model_path

    c = cfg(**{"parallel.tensor_parallel": 2, "train.micro_batch_size": 2})
    p = plan_stage(c, [stage], "embedded", str(tmp_path / "ck"), world_size=4)
    assert isinstance(p, StagePlan)
    assert (p.world_size, p.tensor_parallel, p.pipeline_parallel, p.context_parallel) == (
        4,
        2,
        1,
        1,
    )
    assert (p.data_parallel, p.micro_batches_per_step) == (2, 1)
    assert (p.seq_length, p.tokens_per_rank_per_micro_batch, p.tokens_per_step) == (48, 96, 192)
    assert (p.train_steps, p.sequences, p.start, p.resume_from_step) == (2, 10, "embedded", None)
    hf = M.read_hf_config(resolve_model_path("embedded"))
    assert p.hf_config == hf and p.model["hidden_size"] == hf["hidden_size"] == 128
    assert p.meta_src == resolve_model_path("embedded")
    assert [m["num_sequences"] for m in p.manifests] == [10]
    assert p.model_options == M.ModelOptions(params_dtype="float32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train_steps = 3

    s = p.summary()
    assert list(s) == DRY_RUN_KEYS
    assert s["model_options"] == dataclasses.asdict(p.model_options)
    assert s["model"] == {
        k: hf.get(k)
        for k in (
            "model_type",
            "hidden_size",
            "vocab_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    }
    capsys.readouterr()
    args = ["train", "--dry-run", "--stage-dir", stage, "--from", "embedded"]
    args += ["--to", str(tmp_path / "ck"), "--world-size", "4"]
    for k in ("screening.screen_length=16", "data.seq_length=48", "train.global_batch_size=4"):
        args += ["--set", k]
    args += ["--set", "parallel.tensor_parallel=2", "--set", "train.micro_batch_size=2"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(s))


def test_stage_plan_of_a_run_to_resume(stage, tmp_path, monkeypatch):
    """An output folder with a complete save: the plan resumes at its iteration and rebuilds
    the model with the options the checkpoint recorded (its RoPE base), not the start's."""
    from policylong.paths import resolve_model_path

    monkeypatch.setenv("WORLD_SIZE", "1")
    hf = M.read_hf_config(resolve_model_path("embedded"))
    ck = tmp_path / "ck"
    C.write_meta(str(ck), hf, M.ModelOptions(rotary_base=5e4), None)
    assert plan_stage(cfg(), [stage], "embedded", str(ck)).resume_from_step is None
    (ck / C.LATEST).write_text("2")
    p = plan_stage(cfg(), [stage], "embedded", str(ck))
    assert p.resume_from_step == 2 and p.world_size == 1
    assert p.model_options.rotary_base == 5e4
    assert p.summary()["model_options"]["rotary_base"] == 5e4


def test_nan_weights_refused_before_training():
    """Model sanity before a training stage: NaN or inf anywhere in the weights is a
    ModelError naming the source; finite weights pass."""
    import torch

    from policylong.errors import ModelError
    from policylong.megatron_ext.train import check_finite_weights

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    check_finite_weights(model, "ok")
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            model[1].bias[1] = bad
        with pytest.raises(ModelError, match="ckpt_3: the model's weights hold NaN/inf"):
            check_finite_weights(model, "ckpt_3")


def test_partly_trained_checkpoint_resumes_only_from_its_inputs(stage, tmp_path, monkeypatch):
    """A checkpoint short of its planned steps resumes only with the stage folders, start
    model, config and steps it was started with (its policylong.json); a change is refused
    naming it. A finished one is not trained again, so it is not checked."""
    import shutil

    from policylong.errors import ResumeError
    from policylong.paths import resolve_model_path

    monkeypatch.setenv("WORLD_SIZE", "1")
    hf = M.read_hf_config(resolve_model_path("embedded"))
    ck = tmp_path / "ck"
    c = cfg(**{"train.train_steps": 4})
    key = {
        "start": "embedded",
        "stage_dirs": [os.path.abspath(stage)],
        "seq_length": 48,
        "train_steps": 4,
        "config_hash": c.hash(),
    }
    C.write_meta(str(ck), hf, M.ModelOptions(), None, key)
    (ck / C.LATEST).write_text("2")
    assert plan_stage(c, [stage], "embedded", str(ck)).resume_from_step == 2
    other = tmp_path / "other"
    shutil.copytree(stage, other)
    with pytest.raises(
        ResumeError,
        match=r"ck: a partly trained checkpoint \(step 2 of 4\).*"
        r"the stage folders \(--stage-dir\)",
    ):
        plan_stage(c, [str(other)], "embedded", str(ck))
    with pytest.raises(ResumeError, match=r"changed: the config \(its hash\)\. Resuming"):
        plan_stage(cfg(**{"train.train_steps": 4, "seed": 9}), [stage], "embedded", str(ck))
    with pytest.raises(ResumeError, match=r"the planned steps: 4 -> 5"):
        plan_stage(cfg(**{"train.train_steps": 5}), [stage], "embedded", str(ck))
    (ck / C.LATEST).write_text("4")  # finished: a rerun skips it, whatever it is given
    assert plan_stage(c, [str(other)], "embedded", str(ck)).resume_from_step == 4
