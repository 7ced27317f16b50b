"""The on-policy stage loop (paper §3.2, Algorithm 1): for t = 0..T-1, screen a fresh root set
D_t with the current model M_t, write S_t, train M_t on S_t into M_{t+1}.

    WORKDIR/runs/<preset>/stage_<t>/   S_t (stage dataset: data.bin/.idx, manifest, provenance)
    WORKDIR/runs/<preset>/ckpt_<t+1>/  M_{t+1} (Megatron checkpoint, metrics.jsonl)
    WORKDIR/runs/<preset>/loop.json    one entry per finished step of the loop

Screening is in-process and on-policy: M_t is the Megatron model itself (built from the
checkpoint of the previous stage, or from the HF start model for t = 0), served to the
screening pipeline by ``megatron_ext.lm.MegatronLanguageModel``; no checkpoint is converted.

Resumable at every step: a complete stage folder is never screened again (a ``.partial`` one
resumes), a checkpoint that reached its planned steps is never trained again (a partial one
resumes from its last save).

Under torchrun, every rank runs the loop: screening uses the same TP×PP layout as training,
each data-parallel replica screens its share of the root batches (its TP/PP ranks run the same
forwards, the replica's first rank writes its progress), and global rank 0 merges the shards
into one stage dataset, byte-identical to the one a single process writes
(``screening.pipeline.Shard``). Context parallelism > 1 is refused for in-loop screening: the
model then expects sequences split over the CP ranks; screen with the HF backend instead.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time

import torch.distributed as dist
from megatron.core import parallel_state as ps

from policylong.config import Config, dump_config, load_config
from policylong.corpus import CorpusError, read_documents
from policylong.datasets import load_manifest, sha256_file
from policylong.errors import ConfigError, InputNotFoundError, PolicyLongError
from policylong.lm import load_language_model
from policylong.logs import die_if, faults, setup_logging
from policylong.megatron_ext.checkpointing import (
    is_megatron_checkpoint,
    iter_dir,
    latest_iteration,
    read_meta,
)
from policylong.megatron_ext.lm import megatron_language_model
from policylong.megatron_ext.parallel import destroy_distributed
from policylong.megatron_ext.plan import plan_stage
from policylong.megatron_ext.train import train_stage
from policylong.outputs import check_output, output_lock
from policylong.paths import resolve_model_path, split_source
from policylong.retrieval import open_embedder, open_index
from policylong.screening.pipeline import Shard, screen_stage

log = logging.getLogger("policylong.stages")


def run_dir(cfg: Config) -> str:
    return os.path.join(cfg.workdir, "runs", cfg.loop.preset)


def _count_docs(cfg: Config) -> int:
    return len(read_documents(cfg.path(cfg.corpus.docs)))


def stage_config(cfg: Config, t: int, roots_per_stage: int) -> Config:
    """The screening config of stage t: its disjoint root range and stage index."""
    c = copy.deepcopy(cfg)
    c.stage = t
    c.data.root_offset = cfg.data.root_offset + t * roots_per_stage
    c.data.num_roots = roots_per_stage
    if cfg.loop.tokens_per_stage:
        steps = cfg.loop.tokens_per_stage // (cfg.train.global_batch_size * cfg.data.seq_length)
        c.train.train_steps = max(1, steps)
    return c


def checkpoint_done(ckpt: str) -> bool:
    """True when a checkpoint folder reached the steps its stage planned."""

    if not is_megatron_checkpoint(ckpt):
        return False
    it = latest_iteration(ckpt)
    return it is not None and it >= int(read_meta(ckpt).get("train_steps", 1 << 62))


def model_identity(src: str) -> str:
    """What identifies a model's weights in a resume key: a Megatron checkpoint by its folder
    and iteration (``CKPT@N``, else its latest save), a Hugging Face folder (or ``embedded``)
    by the sha256 of its weight files."""
    path, it = split_source(src)
    if is_megatron_checkpoint(path):
        return f"{os.path.abspath(path)}@{it if it is not None else latest_iteration(path)}"
    d = resolve_model_path(path)
    weights = sorted(n for n in os.listdir(d) if n.endswith((".safetensors", ".bin", ".gguf")))
    return ";".join(f"{n}:{sha256_file(os.path.join(d, n))}" for n in weights) or d


def check_screen_inputs(cfg: Config, out_dir: str, overwrite: bool = False) -> str:
    """What ``policylong screen`` can check before it loads a model, an index or an embedder
    (10-35 s): the output folder, the corpus, the index folder and the model source. Returns
    the model's identity (``model_identity``)."""
    check_output(out_dir, "stage", overwrite=overwrite)
    mid = model_identity(cfg.model.path)  # a missing model folder fails here
    docs = cfg.path(cfg.corpus.docs)
    if not os.path.exists(docs):
        raise CorpusError(f"{docs}: corpus not found (corpus.docs)")
    if not os.access(docs, os.R_OK):
        raise CorpusError(f"{docs}: corpus not readable (corpus.docs)")
    meta = os.path.join(cfg.path(cfg.retrieval.index_dir), "meta.json")
    if not os.path.isfile(meta):
        raise InputNotFoundError(
            f"{cfg.path(cfg.retrieval.index_dir)}: no passage index (no meta.json; "
            "retrieval.index_dir); build it with `policylong index`"
        )
    return mid


def screen_once(cfg: Config, out_dir: str, overwrite: bool = False) -> dict:
    """``policylong screen``: one stage dataset screened with ``model.path``: a PolicyLong
    Megatron checkpoint (``CKPT@N``: its iteration N) is built as the live Megatron model in
    this process; a Hugging Face folder or ``embedded`` is served by the HF backend. Inputs and
    the output folder are checked first; one writer per output folder (``OUT.lock``)."""
    mid = check_screen_inputs(cfg, out_dir, overwrite)
    lock = output_lock(out_dir) if _is_rank0() else contextlib.nullcontext()
    with lock:
        if is_megatron_checkpoint(split_source(cfg.model.path)[0]):
            lm = megatron_language_model(cfg, cfg.model.path)
            desc = cfg.model.path
        else:
            lm = load_language_model(cfg.model.path, cfg.model.device, cfg.model.dtype)
            desc = lm.describe()
        return screen_stage(
            cfg,
            lm,
            open_index(cfg),
            open_embedder(cfg),
            out_dir,
            model_desc=desc,
            overwrite=overwrite,
            model_id=mid,
        )


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _kill_step(t: int) -> int | None:
    for f in faults():
        kind, _, rest = f.partition(":")
        if kind == "train" and rest.split(":")[0] == str(t):
            return int(rest.split(":")[1])
    return None


def _shard():
    """This process's place in data-parallel screening (one process: the defaults)."""

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Shard()
    first = (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_pipeline_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
    return Shard(
        rank=ps.get_data_parallel_rank(),
        size=ps.get_data_parallel_world_size(),
        writer=first,
        leader=dist.get_rank() == 0,
        barrier=dist.barrier,
    )


def check_loop(cfg: Config, world: int = 1) -> int:
    """Everything about a loop config that can be checked before any work; returns the roots
    per stage. Raises ValueError naming the field."""
    cfg.parallel.data_parallel(world)  # a layout that does not divide the world
    if cfg.parallel.context_parallel > 1:
        raise ConfigError(
            f"parallel.context_parallel = {cfg.parallel.context_parallel}: in-loop screening "
            "runs the model on whole root documents, which CP > 1 splits over ranks; run "
            "the loop with context_parallel = 1 or screen each stage with `policylong screen`"
        )
    T = cfg.loop.stages
    n = _count_docs(cfg)
    avail = n - cfg.data.root_offset
    R = cfg.loop.roots_per_stage or avail // T
    if R < 1 or T * R > avail:
        raise ConfigError(
            f"{cfg.path(cfg.corpus.docs)}: {n} documents, data.root_offset = "
            f"{cfg.data.root_offset}: too few root documents for loop.stages = {T} disjoint "
            f"sets of loop.roots_per_stage = {R or cfg.loop.roots_per_stage} "
            f"(needs {cfg.data.root_offset + T * max(R, 1)})"
        )
    per_step = cfg.train.global_batch_size * cfg.data.seq_length
    if 0 < cfg.loop.tokens_per_stage < per_step:
        raise ConfigError(
            f"loop.tokens_per_stage = {cfg.loop.tokens_per_stage} is less than one optimizer "
            f"step (train.global_batch_size × data.seq_length = {per_step} tokens)"
        )
    return R


def overlap_iteration(steps: int, save_interval: int, frac: float) -> int | None:
    """The save of stage t that screens stage t+1 under ``loop.overlap``: the first multiple of
    ``save_interval`` at or after ``frac`` of the stage's steps, if it comes before the end."""
    if save_interval <= 0:
        return None
    k = math.ceil(frac * steps / save_interval) * save_interval
    return k if 0 < k < steps else None


@contextlib.contextmanager
def _stage_lock(stage_dir: str):
    """One screener per stage folder at a time (a screener orphaned by a killed loop may still
    be finishing when the rerun starts another): the second waits, and the lock file is
    removed when done. Only for one-process loops, the only ones that overlap: under torchrun
    every rank screens the same stage together (an exclusive lock there would hold every rank
    but one outside the collectives: a deadlock)."""

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    with output_lock(stage_dir, wait=True):
        yield


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _start_overlap(cfg: Config, t: int, src: str, staleness: dict | None):
    """Screen stage t in a second process (App. E) while this one trains stage t-1."""

    root = run_dir(cfg)
    cfg_path = os.path.join(root, f"stage_{t}.screener.yaml")
    dump_config(cfg, cfg_path)
    env = {
        **os.environ,
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    log_path = os.path.join(root, f"stage_{t}.screener.log")
    cmd = [
        sys.executable,
        "-m",
        "policylong.stages",
        cfg_path,
        str(t),
        src,
        json.dumps(staleness or {}),
    ]
    log.info("stage %d: screening in a second process with %s (log: %s)", t, src, log_path)
    with open(log_path, "ab") as lf:
        return subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env), log_path


def screen_loop_stage(
    cfg: Config, t: int, R: int, lm, model_desc: str, index, emb, staleness=None, model_id=None
) -> str:
    """Screen stage t of the loop (its disjoint roots) with ``lm`` into ``runs/<preset>/
    stage_t``, data-parallel under torchrun (every rank calls it); returns the folder. Shared
    by ``policylong run`` and ``recipe.StageHook``."""

    scfg = stage_config(cfg, t, R)
    stage_dir = os.path.join(run_dir(cfg), f"stage_{t}")
    log.info(
        "stage %d: screening roots [%d, %d) with %s",
        t,
        scfg.data.root_offset,
        scfg.data.root_offset + R,
        model_desc,
    )
    screen_stage(
        scfg,
        lm,
        index,
        emb,
        stage_dir,
        model_desc=model_desc,
        shard=_shard(),
        on_batch=lambda b: die_if(f"screen:{t}:{b}"),
        extra={"staleness": staleness} if staleness else None,
        model_id=model_id,
    )
    return stage_dir


def _screen_one(cfg: Config, t: int, R: int, src: str, index, emb, staleness=None) -> None:
    """Screen stage t with the model built from ``src`` (unless another screener finished it)."""
    stage_dir = os.path.join(run_dir(cfg), f"stage_{t}")
    with _stage_lock(stage_dir):
        if os.path.isfile(os.path.join(stage_dir, "manifest.json")):
            return  # another screener finished it while we waited
        mid = model_identity(src)
        lm = megatron_language_model(stage_config(cfg, t, R), src)
        desc = os.path.abspath(src) if os.path.exists(src) else src
        screen_loop_stage(cfg, t, R, lm, desc, index, emb, staleness, model_id=mid)


def _overlap_main(argv: list[str]) -> int:
    """The second process of ``loop.overlap``: wait for the checkpoint, screen one stage."""

    setup_logging(False)
    cfg_path, t, src, staleness = argv[0], int(argv[1]), argv[2], json.loads(argv[3])
    cfg = load_config(cfg_path)
    R = check_loop(cfg, 1)
    path, it = split_source(src)
    parent = os.getppid()
    while it is not None and not os.path.isdir(iter_dir(path, it)):
        if os.getppid() != parent:
            log.error("the loop process is gone before %s reached iteration %d", path, it)
            return 1
        time.sleep(1.0)
    index, emb = open_index(cfg), open_embedder(cfg)
    try:
        _screen_one(cfg, t, R, src, index, emb, staleness)
    finally:
        destroy_distributed()
    return 0


def run_stages(cfg: Config) -> list[dict]:
    """Run (or resume) the loop; returns one summary per stage."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    R = check_loop(cfg, world)
    if cfg.loop.overlap and world > 1:
        raise ConfigError(
            f"loop.overlap = true with WORLD_SIZE = {world}: overlapped screening runs as one "
            "extra process beside a one-process loop; turn it off for torchrun runs"
        )
    if cfg.loop.overlap and cfg.train.save_interval <= 0:
        raise ConfigError(
            "loop.overlap = true needs train.save_interval > 0 (stage t+1 is screened with a "
            "checkpoint that stage t saves before its end)"
        )
    rank0 = int(os.environ.get("RANK", "0")) == 0
    T = cfg.loop.stages
    root = run_dir(cfg)
    os.makedirs(root, exist_ok=True)
    index, emb = open_index(cfg), open_embedder(cfg)
    history_path = os.path.join(root, "loop.json")
    history = []
    if os.path.isfile(history_path):
        with open(history_path) as f:
            history = json.load(f)
    done_stages = {h["stage"] for h in history}
    out = []
    pending = None  # (stage, Popen, log path) of an overlapped screener
    complete = lambda d: os.path.isfile(os.path.join(d, "manifest.json"))  # noqa: E731
    for t in range(T):
        scfg = stage_config(cfg, t, R)
        stage_dir = os.path.join(root, f"stage_{t}")
        ckpt = os.path.join(root, f"ckpt_{t + 1}")
        prev = cfg.model.path if t == 0 else os.path.join(root, f"ckpt_{t}")
        screener_src = prev if cfg.loop.on_policy else cfg.model.path
        t0 = time.time()
        if pending is not None and pending[0] == t:
            rc = pending[1].wait()
            if rc != 0:
                raise PolicyLongError(
                    f"overlapped screening of stage {t} failed (exit {rc}); see {pending[2]}"
                )
            pending = None
        if not complete(stage_dir):
            _screen_one(cfg, t, R, screener_src, index, emb)
        screen_s = time.time() - t0
        t1 = time.time()
        man = load_manifest(stage_dir)
        nxt = os.path.join(root, f"stage_{t + 1}")
        overlap_next = cfg.loop.overlap and t + 1 < T and not complete(nxt)
        train_needed = not checkpoint_done(ckpt)
        steps = (  # one plan (it hashes the stage's files) for the overlap and the warning
            plan_stage(scfg, [stage_dir], prev, ckpt).train_steps
            if train_needed or (overlap_next and cfg.loop.on_policy)
            else None
        )
        if overlap_next:
            src, stale = cfg.model.path, None
            if cfg.loop.on_policy:
                k = overlap_iteration(steps, cfg.train.save_interval, cfg.loop.overlap_after)
                if k is not None:
                    src = f"{ckpt}@{k}"
                    stale = {
                        "checkpoint": ckpt,
                        "iteration": k,
                        "stage_steps": steps,
                        "steps_behind": steps - k,
                    }
                else:
                    src = None  # no save before the end: screen after training instead
            if src is not None:
                pending = (t + 1, *_start_overlap(cfg, t + 1, src, stale))
        if train_needed:
            nseq = man["num_sequences"]
            samples = steps * cfg.train.global_batch_size
            if samples > nseq:
                log.warning(
                    "stage %d: %d training samples from %d sequences (%.1f passes); the paper "
                    "trains on fresh data only: screen more roots (loop.roots_per_stage)",
                    t,
                    samples,
                    nseq,
                    samples / nseq,
                )
            log.info("stage %d: training %s -> %s", t, prev, ckpt)
            train_stage(scfg, [stage_dir], prev, ckpt, kill_at_step=_kill_step(t))
            die_if(f"stage:{t}")
        summary = {
            "stage": t,
            "stage_dir": stage_dir,
            "checkpoint": ckpt,
            "screened_with": man.get("model", screener_src),
            "screen_seconds": round(screen_s, 1),
            "train_seconds": round(time.time() - t1, 1),
            "stats": man.get("stats", {}),
        }
        if man.get("staleness"):
            summary["staleness"] = man["staleness"]
        with open(os.path.join(ckpt, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        summary["final_loss"] = rows[-1]["loss"] if rows else None
        if t not in done_stages and rank0:
            history.append({k: v for k, v in summary.items() if k != "stats"})
            with open(history_path + ".tmp", "w") as f:
                json.dump(history, f, indent=2)
            os.replace(history_path + ".tmp", history_path)
        log.info(
            "stage %d done: %s", t, json.dumps({k: v for k, v in summary.items() if k != "stats"})
        )
        out.append(summary)
    return out


if __name__ == "__main__":
    sys.exit(_overlap_main(sys.argv[1:]))
