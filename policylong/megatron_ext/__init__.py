"""Megatron-Core: the model and its HF mapping, data, checkpointing, the training step, the live
model as a ``LanguageModel``, and the CPU compatibility layer."""
