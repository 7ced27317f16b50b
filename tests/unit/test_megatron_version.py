"""megatron-core versions are stated, not assumed: the CPU layer needs the release it patches,
the GPU path warns outside the range it is tested with."""

from __future__ import annotations

import logging

import megatron.core
import pytest
import torch

from policylong.megatron_ext import cpu, parallel


def test_the_cpu_layer_refuses_another_release(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match=r"megatron-core 0.17.0 is installed.*needs 0.16.1"):
        cpu.apply()


def test_the_installed_release_is_the_one_the_cpu_layer_patches():
    """CI installs the ``cpu`` extra: the pin and ``cpu.MEGATRON_CORE`` must agree."""
    assert megatron.core.__version__ == cpu.MEGATRON_CORE


@pytest.mark.parametrize("version,tested", [("0.16.1", True), ("0.17.2", False), ("0.15.0", False)])
def test_outside_the_tested_range_warns_naming_what_is_untested(
    monkeypatch, caplog, version, tested
):
    monkeypatch.setattr(megatron.core, "__version__", version)
    with caplog.at_level(logging.WARNING, logger="policylong.megatron_ext.parallel"):
        assert parallel.check_megatron_core_version() is tested
    assert (f"megatron-core {version} lies outside" in caplog.text) is not tested
    if not tested:
        assert "untested" in caplog.text
