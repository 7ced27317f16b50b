"""GPTDataset over stage datasets, through megatron-core's own dataset builder.

Every stage sequence is exactly L tokens and is one document of the indexed dataset, so with
``sequence_length = L`` and ``add_extra_token_to_sequence = False`` each GPTDataset sample is
exactly one stage sequence (the label of its last token is padding and masked). No document
masking inside a sequence: ``reset_attention_mask`` / ``reset_position_ids`` stay off, because
the point of the data is attention across chunks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from policylong.datasets import StageDatasetError, verify_stage_dataset


@dataclass
class StageTokenizer:
    """The few tokenizer facts GPTDataset reads (``vocab_size``, ``eod``); no ``pad``
    attribute, so Megatron pads with its own id (-1) that never collides with a real token."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:
        """Part of the dataset's cache key (Megatron hashes the config with it)."""
        return {
            "class": "policylong.StageTokenizer",
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }


def build_gpt_dataset(
    stage_dirs: list[str],
    seq_length: int,
    eod: int,
    seed: int = 1234,
    num_samples: int | None = None,
    weights: list[float] | None = None,
    cache_dir: str | None = None,
    check_sha: bool = True,
):
    """A megatron-core ``GPTDataset`` (or a ``BlendedDataset`` for several stages) over the
    train split of one or more stage folders."""

    if not stage_dirs:
        raise ValueError("build_gpt_dataset: no stage folder given")
    vocab = 0
    for d in stage_dirs:
        m = verify_stage_dataset(d, check_sha=check_sha)
        if seq_length > m["seq_length"]:
            raise StageDatasetError(
                f"{d}: sequence length {seq_length} exceeds the dataset's sequences "
                f"({m['seq_length']} tokens each)"
            )
        vocab = max(vocab, int(m["vocab_size"]))
    prefixes = [os.path.join(os.path.abspath(d), "data") for d in stage_dirs]
    if cache_dir is None:  # beside the stage folders, never inside one
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(stage_dirs[0])), ".gpt_cache")
    if weights is not None and len(weights) != len(prefixes):
        raise ValueError(f"{len(weights)} weights for {len(prefixes)} stage folders")
    cfg = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split="100,0,0",
        tokenizer=StageTokenizer(vocab, eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        add_extra_token_to_sequence=False,
        path_to_cache=cache_dir,
        mmap_bin_files=True,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, None, None], lambda: True, cfg
    ).build()
    return train
