"""The stage loop as a hook for an existing Megatron training script (paper Algorithm 1).

A ``pretrain_gpt``-style script keeps its model, optimizer and training step; between stages
it asks the hook for the next stage's data, screened by the model it is training right now
(on-policy, in-process: no checkpoint conversion)::

    hook = StageHook(cfg, hf_cfg, tokenizer_dir)          # cfg: a policylong Config
    for t in range(hook.num_stages):
        stage_dir = hook.regenerate(model, t)            # every rank calls it (collective)
        data = hook.data_iterator(t, steps_per_stage)
        for step in range(steps_per_stage):              # your own step, or PolicyLong's:
            train_step(cfg, model, optimizer, scheduler, data)   # megatron_ext.step
        save_checkpoint(...)

With Megatron-LM's own ``pretrain()``, which builds its datasets from ``--data-path``, run it
once per stage: ``hook.regenerate(model, t)`` at the end of stage t−1 (or a screening job
between runs), then pass ``hook.data_path(t)`` as ``--data-path`` of stage t.
``examples/pretrain_gpt_policylong.py`` is a complete script wired this way.

Screening uses the script's parallel layout as ``policylong run`` does: each data-parallel
replica screens its share of the roots, the TP ranks of a replica combine vocab-parallel
entropies, global rank 0 writes the merged stage dataset. The stage folders, their resume
behaviour and their bytes are those of ``policylong run`` (same config → same sha256).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model

from policylong.config import Config
from policylong.datasets import load_manifest
from policylong.megatron_ext.data import build_gpt_dataset
from policylong.megatron_ext.lm import MegatronLanguageModel
from policylong.megatron_ext.step import batch_indices, collate, micro_batches
from policylong.retrieval import open_embedder, open_index
from policylong.stages import check_loop, run_dir, screen_loop_stage


class StageHook:
    """Regenerates stage datasets with the live model and serves them to a training loop.

    Args:
        cfg: PolicyLong config (screening, data, retrieval, loop sections are read).
        hf_cfg: the HF config the GPTModel was built from (vocabulary, window).
        tokenizer_dir: folder with the model's tokenizer (the HF start checkpoint).
        index, embedder: a loaded ``PassageIndex`` / ``Embedder`` (default: from ``cfg``).
    """

    def __init__(self, cfg: Config, hf_cfg: dict, tokenizer_dir: str, index=None, embedder=None):
        self.cfg = cfg
        self.hf_cfg = hf_cfg
        self.tokenizer_dir = tokenizer_dir
        self.num_stages = cfg.loop.stages
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.roots_per_stage = check_loop(cfg, world)
        self.root = run_dir(cfg)
        self.index = index or open_index(cfg)
        self.embedder = embedder or open_embedder(cfg)

    def stage_dir(self, t: int) -> str:
        return os.path.join(self.root, f"stage_{t}")

    def data_path(self, t: int) -> list[str]:
        """Megatron-LM ``--data-path`` arguments for stage t (weight, prefix)."""
        return ["1.0", os.path.join(os.path.abspath(self.stage_dir(t)), "data")]

    @torch.no_grad()
    def regenerate(self, model, t: int, model_desc: str = "megatron-live") -> str:
        """Screen stage t's roots with ``model`` (this rank's GPTModel, possibly wrapped in DDP /
        Float16Module) and write the stage dataset; a complete stage is returned as is, a
        partial one resumes. Collective: every rank of the job calls it."""

        out = self.stage_dir(t)
        if os.path.isfile(os.path.join(out, "manifest.json")):
            return out
        core = unwrap_model(model)
        was_training = core.training
        core.eval()
        try:
            lm = MegatronLanguageModel(core, self.hf_cfg, self.tokenizer_dir)
            os.makedirs(self.root, exist_ok=True)
            screen_loop_stage(
                self.cfg,
                t,
                self.roots_per_stage,
                lm,
                model_desc,
                self.index,
                self.embedder,
            )
        finally:
            core.train(was_training)
        return out

    def dataset(self, t: int, num_samples: int):
        """megatron-core ``GPTDataset`` over stage t (``num_samples`` samples, epochs as needed)."""

        d = self.stage_dir(t)
        m = load_manifest(d)
        return build_gpt_dataset(
            [d], m["seq_length"], int(m["eod"]), seed=self.cfg.seed, num_samples=num_samples
        )

    def data_iterator(self, t: int, num_steps: int, start_step: int = 0):
        """This data-parallel rank's micro-batches (dicts of ``tokens``, ``labels``,
        ``loss_mask``, ``position_ids``) for optimizer steps ``[start_step, num_steps)`` of
        stage t, ``global_batch_size / (micro_batch_size · DP)`` per step, in the order
        ``policylong train`` uses (deterministic: a resumed run sees the same samples)."""

        dp = ps.get_data_parallel_world_size()
        dp_rank = ps.get_data_parallel_rank()
        micro = micro_batches(self.cfg)
        ds = self.dataset(t, num_steps * self.cfg.train.global_batch_size)
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        for step in range(start_step, num_steps):
            for j in range(micro):
                yield collate(ds, batch_indices(step, j, self.cfg, dp_rank, dp), device)
