"""Configs: validation names the field, YAML + dotted overrides, presets stay loadable."""

from __future__ import annotations

import glob
import os

import pytest

from policylong.config import Config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "override,field",
    [
        ("screening.percentile=0", "screening.percentile"),
        ("screening.percentile=101", "screening.percentile"),
        ("screening.tau_pos=0", "screening.tau_pos"),
        ("screening.tau_pos=1", "screening.tau_pos"),
        ("screening.position_mode=median", "screening.position_mode"),
        ("screening.negatives=all", "screening.negatives"),
        ("data.seq_length=128", "data.seq_length"),  # shorter than screen_length 256
        ("model.dtype=int8", "model.dtype"),
        ("screening.top_k=zero", "screening.top_k"),
        ("screening.verify=maybe", "screening.verify"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_and_bad_override():
    with pytest.raises(ValueError, match="screening.percentil"):
        load_config(None, ["screening.percentil=5"])
    with pytest.raises(ValueError, match="section.field=value"):
        load_config(None, ["screening"])


def test_overrides_and_hash(tmp_path):
    a = load_config(None, ["screening.percentile=7.5", "seed=3"])
    assert a.screening.percentile == 7.5 and a.seed == 3
    assert a.hash() != load_config(None, ["seed=4"]).hash()
    # the workdir and the device do not change the bytes, so not the hash
    assert (
        a.hash()
        == load_config(
            None, ["screening.percentile=7.5", "seed=3", "workdir=/elsewhere", "model.device=cpu"]
        ).hash()
    )


def test_demo_preset_is_the_defaults():
    cfg = load_config(os.path.join(ROOT, "examples", "configs", "demo.yaml"))
    assert cfg.to_dict() == Config().to_dict()


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))
)
def test_every_preset_loads(path):
    load_config(path)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize("name", sorted(__import__("policylong.stages").stages.PRESETS))
def test_loop_presets_agree_with_their_yaml(name):
    """Each baseline/ablation YAML gives the same config as the preset's overrides."""
    from policylong.stages import preset_overrides

    a = load_config(os.path.join(ROOT, "examples", "configs", f"{name}.yaml"))
    b = load_config(None, preset_overrides(name))
    assert a.to_dict() == b.to_dict()
    assert a.loop.preset == name


def test_several_presets_merge_in_order():
    """A size preset then a method preset: the later file wins field by field."""
    size = os.path.join(ROOT, "examples", "configs", "qwen2.5-3b-128k.yaml")
    method = os.path.join(ROOT, "examples", "configs", "entropylong.yaml")
    c = load_config([size, method], ["loop.stages=4"])
    s = load_config(size)
    assert c.data.seq_length == s.data.seq_length == 131072
    assert c.parallel.context_parallel == s.parallel.context_parallel
    assert (c.loop.preset, c.loop.on_policy, c.screening.position_mode) == (
        "entropylong",
        False,
        "sigma",
    )
    assert c.loop.stages == 4
