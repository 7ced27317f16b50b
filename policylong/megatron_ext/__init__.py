"""Megatron-Core: the model and its HF mapping, data, checkpointing, the training step, the live
model as a ``LanguageModel``, and the CPU compatibility layer."""

import warnings

# megatron-core warns once per module at import on a machine without Transformer Engine or
# Apex (6 warnings per process, on every CPU run): the fallbacks it names are the ones we use.
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
