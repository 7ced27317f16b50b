"""Configs: validation names the field, YAML + dotted overrides, presets stay loadable."""

from __future__ import annotations

import os

import pytest

from policylong.config import PRESET_DIR, Config, load_config, preset_names

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
        ("train.layer_spec=fast", "train.layer_spec"),
        ("seed=-1", "seed"),
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
    assert load_config("demo").to_dict() == Config().to_dict()


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_by_name_and_by_path(name):
    by_name = load_config(name)
    assert by_name.to_dict() == load_config(os.path.join(PRESET_DIR, f"{name}.yaml")).to_dict()


def test_method_presets_name_their_run():
    """A method preset sets loop.preset to its own name (its run folder), so two methods never
    share ``runs/<preset>/``."""
    methods = [n for n in preset_names() if n in ("policylong", "entropylong", "nextlong")]
    methods += [n for n in preset_names() if n.startswith("ablation_")]
    assert len(methods) == 7
    for name in methods:
        assert load_config(name).loop.preset == name


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml.*shipped preset: ablation_iteration"):
        load_config("nope.yaml")


def test_several_presets_merge_in_order():
    """A size preset then a method preset: the later file wins field by field."""
    size = os.path.join(PRESET_DIR, "qwen2.5-3b-128k.yaml")
    method = "entropylong"
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


def test_literal_fields_list_their_choices():
    with pytest.raises(ValueError, match="'data.separator' = 'nl': must be one of eos, none"):
        load_config(None, ["data.separator=nl"])


@pytest.mark.parametrize(
    "override,changes",
    [
        ("screening.tau_pos=0.5", True),
        ("model.path=/elsewhere", True),
        ("seed=7", True),
        ("model.device=cpu", False),
        ("retrieval.batch_size=7", False),
        ("retrieval.use_gpu=no", False),
        ("workdir=/elsewhere", False),
        ("train.lr=0.5", False),
        ("parallel.tensor_parallel=2", False),
        ("loop.stages=9", False),
    ],
)
def test_the_hash_covers_exactly_what_changes_a_stage(override, changes):
    """Fields marked ``hash=False`` (settings that cannot change a stage dataset's bytes) leave
    the hash alone; every other field changes it."""
    assert (load_config(None, [override]).hash() != Config().hash()) is changes
