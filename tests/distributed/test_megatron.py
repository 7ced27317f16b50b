"""Megatron-Core on CPU under torchrun + gloo: exact HF conversion, parallel consistency,
training from a screened stage dataset, kill-and-resume.

Every case runs ``_megatron_worker.py`` under ``python -m torch.distributed.run`` in a fresh
process group (megatron-core's parallel state is process-global). References are independent:
Hugging Face forwards of the same weights, the single-process loss, the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

pytestmark = pytest.mark.distributed

WORKER = os.path.join(os.path.dirname(__file__), "_megatron_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, target: list[str], args, env_extra=None, timeout: int = 900):
    """``torchrun --nproc-per-node nproc TARGET ARGS``; returns (exit code, stdout + stderr)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={_free_port()}",
        *target,
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    # output to a file, not a pipe: a helper process a SIGKILLed worker leaves behind would
    # hold a pipe open and block the wait
    with tempfile.TemporaryFile("w+") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        log.seek(0)
        return rc.returncode, log.read()


def torchrun(nproc: int, *args, expect_ok: bool = True, timeout: int = 900):
    """Run the worker under torchrun; returns (exit code, stdout + stderr)."""
    rc, out = _launch(nproc, [WORKER], args, timeout=timeout)
    if expect_ok:
        assert rc == 0, out[-8000:]
    return rc, out


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny HF models of each family: Qwen2 (QKV bias, untied head), Llama (no bias, tied
    embeddings), Qwen3 (QK-norm, head_dim 32 != 64 / 4 heads, untied) and Gemma 3 text (tied;
    sliding and global layers alternate, so each PP stage has both; a window of 8 under the
    tests' 29 tokens; query_pre_attn_scalar 24 != head_dim). vocab 1520 divides by 2 and 4,
    4 layers divide by 2 stages. The Qwen3 / Gemma 3 norm weights are randomised (HF
    initialises them to one / zero), so a wrong norm convention shows in the logits."""
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    root = tmp_path_factory.mktemp("hf")
    common = dict(
        vocab_size=1520,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=3,
    )
    out = {}
    torch.manual_seed(0)
    q = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, rope_theta=50000.0, **common))
    out["qwen2"] = str(root / "tiny_qwen2")
    q.save_pretrained(out["qwen2"])
    ll = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    out["llama"] = str(root / "tiny_llama")
    ll.save_pretrained(out["llama"])

    def jitter_norms(m):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.3)

    q3 = Qwen3ForCausalLM(Qwen3Config(tie_word_embeddings=False, head_dim=32, **common))
    jitter_norms(q3)
    out["qwen3"] = str(root / "tiny_qwen3")
    q3.save_pretrained(out["qwen3"])
    g3 = Gemma3ForCausalLM(
        Gemma3TextConfig(
            head_dim=32,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
            query_pre_attn_scalar=24,
            pad_token_id=0,
            **common,
        )
    )
    jitter_norms(g3)
    out["gemma3"] = str(root / "tiny_gemma3")
    g3.save_pretrained(out["gemma3"])
    return out


@pytest.fixture(scope="session")
def copy_stage(tmp_path_factory):
    """A stage dataset (Megatron IndexedDatasetBuilder, the stage-folder layout) of 64-token
    sequences whose second half repeats the first."""
    from policylong.datasets import commit, write_stage_dataset

    d = tmp_path_factory.mktemp("stage")
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(48):
        a = rng.integers(10, 1500, size=32)
        seqs.append(np.concatenate([a, a]).tolist())
    part, final = str(d / "stage_0.partial"), str(d / "stage_0")
    os.makedirs(part)
    prov = [{"root": str(i)} for i in range(len(seqs))]
    write_stage_dataset(part, seqs, prov, {"stage": 0, "eod": 3}, 1520, 64)
    commit(part, final)
    return final


@pytest.mark.parametrize(
    "tp,pp,spec", [(1, 1, "local"), (2, 1, "local"), (1, 2, "local"), (2, 1, "sdpa")]
)
def test_converted_logits_equal_hf_and_export_round_trips(tp, pp, spec, tiny_models, tmp_path):
    from policylong.paths import resolve_model_path

    models = [tiny_models[k] for k in ("qwen2", "llama", "qwen3", "gemma3")]
    models.append(resolve_model_path("embedded"))
    args = ["exact", "--json", tmp_path / "r.json", "--tp", tp, "--pp", pp, "--spec", spec]
    args += ["--export-dir", tmp_path / "export"]
    for m in models:
        args += ["--hf", m]
    torchrun(tp * pp, *args)
    res = _read(tmp_path / "r.json")
    assert res["layout"] == {"tp": tp, "pp": pp, "dp": 1}
    for name, e in res.items():
        if name == "layout":
            continue
        assert e["max_abs_diff"] <= 1e-4, (name, e)
        assert e["hidden_max_abs_diff"] <= 1e-4, (name, e)
        assert e["greedy_equal"] and e["greedy_logprob_diff"] <= 1e-4, (name, e)
        assert e["export_same_names"] and e["export_bitwise"] and e["reload_logits_equal"], e
    # the embedded model's 1519-token vocabulary is padded by one zero row at TP = 2
    assert res["base_model"]["pad_columns"] == (1 if tp == 2 else 0)


def test_parallel_training_matches_single_process(tiny_models, copy_stage, tmp_path):
    """TP=2, PP=2 and DP=2 give the single-process loss of the first steps (dropout is off)."""
    losses = {}
    for name, nproc, tp, pp in [
        ("single", 1, 1, 1),
        ("tp2", 2, 2, 1),
        ("pp2", 2, 1, 2),
        ("dp2", 2, 1, 1),
    ]:
        out = tmp_path / name
        torchrun(
            nproc,
            "train",
            "--json",
            out.with_suffix(".json"),
            "--tp",
            tp,
            "--pp",
            pp,
            "--init",
            tiny_models["qwen2"],
            "--stage",
            copy_stage,
            "--ckpt",
            out,
            "--steps",
            3,
            "--gbs",
            8,
            "--mb",
            2,
        )
        losses[name] = [r["loss"] for r in _read(out.with_suffix(".json"))["metrics"]]
    ref = losses["single"]
    assert len(ref) == 3
    for name in ("tp2", "pp2", "dp2"):
        assert np.allclose(losses[name], ref, rtol=0, atol=1e-5), (name, losses[name], ref)


@pytest.fixture(scope="session")
def screened_stage(tmp_path_factory, make_cfg, tokenizer, index, embedder):
    """A stage dataset written by the screening pipeline (copy model, 12 planted roots)."""
    from conftest import CopyModel
    from policylong.screening import pipeline as pl

    d = tmp_path_factory.mktemp("screened")
    cfg = make_cfg(str(d), **{"data.seq_length": 320, "screening.screen_length": 192})
    out = str(d / "stage_0")
    pl.screen_stage(
        cfg, CopyModel(tokenizer), index, embedder, out, model_desc="copy", progress=False
    )
    return out


def test_stage_trains_from_screened_data_and_resumes_after_kill(screened_stage, tmp_path):
    """The embedded model trains on a screened stage: the loss falls, checkpoints are saved,
    and a run SIGKILLed after step 12 resumes from its step-10 checkpoint to the same losses
    as the uninterrupted run."""
    from policylong.datasets import verify_stage_dataset
    from policylong.paths import resolve_model_path

    m = verify_stage_dataset(screened_stage)
    assert m["num_sequences"] >= 8 and m["seq_length"] == 320
    base = resolve_model_path("embedded")
    common = [
        "--init",
        base,
        "--stage",
        screened_stage,
        "--steps",
        20,
        "--gbs",
        4,
        "--mb",
        2,
        "--seq",
        320,
        "--lr",
        2e-3,
        "--save-interval",
        5,
    ]
    full = tmp_path / "full"
    torchrun(1, "train", "--json", tmp_path / "full.json", "--ckpt", full, *common)
    rows = _read(tmp_path / "full.json")["metrics"]
    loss = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert np.mean(loss[-4:]) < np.mean(loss[:4]) - 0.2, loss
    assert (full / "latest_checkpointed_iteration.txt").read_text() == "20"
    assert (full / "iter_0000020" / "metadata.json").is_file()

    _kill_and_resume(tmp_path, common, kill=12, last_save=10, ref_losses=loss)


def _kill_and_resume(tmp_path, args, kill: int, last_save: int, ref_losses: list[float]):
    """SIGKILL a training run after step ``kill``; its last complete save is ``last_save``;
    the rerun resumes there and logs every step once, with the uninterrupted run's losses."""
    part = tmp_path / "part"
    rc, _ = torchrun(
        1,
        "train",
        "--json",
        tmp_path / "x.json",
        "--ckpt",
        part,
        *args,
        "--kill",
        kill,
        expect_ok=False,
    )
    assert rc != 0 and (part / "latest_checkpointed_iteration.txt").read_text() == str(last_save)
    torchrun(1, "train", "--json", tmp_path / "part.json", "--ckpt", part, *args)
    rows = _read(tmp_path / "part.json")["metrics"]
    assert [r["step"] for r in rows] == list(range(1, len(ref_losses) + 1))
    assert np.allclose([r["loss"] for r in rows], ref_losses, rtol=0, atol=1e-6)


def test_bf16_stage_saves_and_resumes(screened_stage, tmp_path):
    """bf16 (Float16Module + megatron's mixed-precision optimizer, fp32 main weights): the
    checkpoint saves (the H200 run without Float16Module failed at its first save: "Optimizer
    shape ((896,) does not match model shape ((1152,))"; without the wrap this CPU test fails
    the same way), a run killed after step 5 resumes from step 4 to the same losses, and the
    first loss is the float32 one up to bf16 rounding."""
    from policylong.paths import resolve_model_path

    common = [
        "--init",
        resolve_model_path("embedded"),
        "--stage",
        screened_stage,
        "--steps",
        6,
        "--gbs",
        4,
        "--mb",
        2,
        "--seq",
        320,
        "--lr",
        1e-4,
        "--save-interval",
        2,
    ]
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--dtype", "bfloat16"])):
        torchrun(
            1,
            "train",
            "--json",
            tmp_path / f"{name}.json",
            "--ckpt",
            tmp_path / name,
            *common,
            *extra,
        )
        runs[name] = [r["loss"] for r in _read(tmp_path / f"{name}.json")["metrics"]]
    assert abs(runs["bf16"][0] - runs["fp32"][0]) < 0.02, runs
    assert (tmp_path / "bf16" / "iter_0000006" / "metadata.json").is_file()
    _kill_and_resume(tmp_path, [*common, "--dtype", "bfloat16"], 5, 4, runs["bf16"])


def test_mismatched_hf_checkpoint_is_a_clear_error(tiny_models, tmp_path):
    """A config whose shapes do not match the weights fails naming the tensor and shapes."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["qwen2"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, out = torchrun(
        1,
        "exact",
        "--json",
        tmp_path / "r.json",
        "--hf",
        bad,
        "--export-dir",
        tmp_path / "e",
        expect_ok=False,
    )
    assert rc != 0
    assert "CheckpointMismatchError" in out and "gate_proj.weight has shape (96, 64)" in out


def _cli(*args, cwd=None, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    with tempfile.TemporaryFile("w+") as log:
        r = subprocess.run(
            [sys.executable, "-m", "policylong.cli", *map(str, args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            timeout=600,
        )
        log.seek(0)
        return r.returncode, log.read()


def test_cli_convert_then_export_round_trips(tmp_path):
    """`policylong convert` writes a dist_checkpointing folder; `policylong export` (with a
    raised RoPE base for the extended window) gives back the same tensors and a config that
    carries the new base."""
    import torch

    from policylong.megatron_ext.model import HFWeights, _rope
    from policylong.paths import resolve_model_path

    ck, out = tmp_path / "ck", tmp_path / "hf"
    rc, log = _cli("convert", "--hf", "embedded", "--out", ck, "--set", "train.rotary_base=1e6")
    assert rc == 0, log[-4000:]
    assert (ck / "iter_0000000" / "metadata.json").is_file()
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "0"
    rc, log = _cli("export", "--ckpt", ck, "--hf-out", out)
    assert rc == 0, log[-4000:]
    src, dst = HFWeights(resolve_model_path("embedded")), HFWeights(str(out))
    assert sorted(src.weight_map) == sorted(dst.weight_map)
    assert all(torch.equal(src.get(k), dst.get(k)) for k in src.weight_map)
    assert _rope(json.loads((out / "config.json").read_text())) == (1e6, None)
    assert (out / "tokenizer.json").is_file()
    rc, log = _cli("convert", "--hf", "embedded", "--out", ck)
    assert rc == 2 and "already holds a Megatron checkpoint" in log


def test_launch_scripts_dry_run(tmp_path, copy_stage):
    """Both launchers print their torchrun/srun command and the planned layout (TP 2 × CP 4 on
    8 ranks per node for the paper's config) without starting anything."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DRY_RUN": "1",
        "STAGE": copy_stage,
        "TO": str(tmp_path / "ck"),
        "FROM": "embedded",
        "CONFIG": "qwen2.5-3b-128k",
    }
    extra = [
        *("--set", "data.seq_length=64", "--set", "screening.screen_length=16"),
        *("--set", "train.global_batch_size=16"),
    ]

    def dry_run(script, **env_extra):
        """(the launch command it prints, the plan)"""
        r = subprocess.run(
            ["bash", script, *extra],
            cwd=root,
            env={**env, **env_extra},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        first, plan = r.stdout.split("\n", 1)
        return first, json.loads(plan)

    first, p = dry_run("examples/train_single_node.sh", NPROC="8")
    assert first.startswith("torchrun --standalone --nproc-per-node 8")
    assert (p["tensor_parallel"], p["context_parallel"], p["data_parallel"]) == (2, 4, 1)
    assert p["tokens_per_rank_per_micro_batch"] == 16
    first, p = dry_run("examples/train_multinode.slurm", NNODES="2")
    assert first.startswith("srun --kill-on-bad-exit=1 torchrun --nnodes 2 --nproc-per-node 8")
    assert p["data_parallel"] == 2


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_live_megatron_model_screens_like_the_hf_backend(tp, pp, tmp_path):
    """The on-policy backend: root entropies and NLLs through the live Megatron model (vocab-
    parallel entropy over the TP group, hidden states broadcast over the PP group) equal the
    Hugging Face backend's on the same weights, on every rank."""
    from policylong.paths import resolve_model_path

    base = resolve_model_path("embedded")
    torchrun(
        tp * pp, "entropy", "--json", tmp_path / "r.json", "--tp", tp, "--pp", pp, "--hf", base
    )
    res = _read(tmp_path / "r.json")
    assert len(res) == tp * pp
    for r in res:
        assert r["max_entropy_diff"] < 1e-4 and r["max_nll_diff"] < 1e-4, r
    # 1519 rows padded to 1520 at TP = 2: the pad row is dropped from the last shard
    assert sum(r["head_rows"] for r in res) == (1519 if tp == 2 else 1519 * pp)


LOOP_SETS = [
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.lr=1e-4",
    "train.min_lr=1e-5",
    "train.train_steps=4",
    "train.save_interval=2",
    "loop.stages=2",
    "loop.roots_per_stage=10",
]


def _sets(*kv):
    return [x for k in kv for x in ("--set", k)]


def _screen_manifest(out, model, stage, *args):
    """`policylong screen --model MODEL --stage STAGE --out OUT ARGS...`; its manifest."""
    rc, log = _cli("screen", *args, "--model", model, "--stage", stage, "--out", out)
    assert rc == 0, log[-3000:]
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    """A synthetic corpus and index, and one uninterrupted two-stage `policylong run`."""
    w = tmp_path_factory.mktemp("loop") / "w"
    rc, log = _cli("synth", "--out", w / "corpus", "--roots", 24)
    assert rc == 0, log[-3000:]
    base = ["--workdir", w, "--set", "data.seq_length=512"]
    rc, log = _cli("index", *base)
    assert rc == 0, log[-3000:]
    rc, log = _cli("run", *base, *_sets(*LOOP_SETS))
    assert rc == 0, log[-4000:]
    return w, base


def _provenance(stage_dir):
    return [json.loads(line) for line in (stage_dir / "provenance.jsonl").read_text().splitlines()]


def _torchrun_cli(nproc: int, *args, env_extra=None):
    return _launch(nproc, ["-m", "policylong.cli"], args, env_extra)


def test_on_policy_loop_two_stages_and_rerun(loop_run, tmp_path):
    """`policylong run`: stage 0 is screened by the live Megatron model M_0 into exactly the
    bytes the Hugging Face backend writes; stage 1 is screened by M_1 (the checkpoint stage 0
    trained) on disjoint roots; a rerun redoes nothing."""
    w, sets = loop_run
    loop = sets + _sets(*LOOP_SETS)
    runs = w / "runs" / "policylong"
    m0 = json.loads((runs / "stage_0" / "manifest.json").read_text())
    m1 = json.loads((runs / "stage_1" / "manifest.json").read_text())
    assert m0["model"] == "embedded" and m1["model"] == str(runs / "ckpt_1")
    assert (runs / "ckpt_2" / "latest_checkpointed_iteration.txt").read_text() == "4"
    roots = [
        {
            p["root"]
            for p in map(
                json.loads, (runs / f"stage_{t}" / "provenance.jsonl").read_text().splitlines()
            )
        }
        for t in (0, 1)
    ]
    assert roots[0] and roots[1] and not roots[0] & roots[1]
    # the same stage through the Hugging Face backend: byte-identical
    hf0 = _screen_manifest(
        tmp_path / "hf_stage_0", "embedded", 0, *sets, "--set", "data.num_roots=10"
    )
    assert hf0["sha256"] == m0["sha256"]
    # rerun: nothing is screened or trained again
    stamps = {
        p: p.stat().st_mtime_ns
        for p in [runs / "stage_1" / "data.bin", runs / "ckpt_2" / "iter_0000004"]
    }
    rc, log = _cli("run", *loop)
    assert rc == 0, log[-3000:]
    assert all(p.stat().st_mtime_ns == s for p, s in stamps.items())
    assert len(json.loads((runs / "loop.json").read_text())) == 2


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_loop_screening_with_two_ranks_matches_one_process(loop_run, layout):
    """`policylong run` under torchrun with 2 ranks. TP=2: the live Megatron model screens with
    vocab-parallel entropy over the TP group; its stage 0 agrees with the single-process run
    (whose stage 0 is byte-identical to the HF backend's at TP=1): high-entropy positions and
    their entropies (within 1e-4 plus the 4-decimal rounding of provenance), and the same
    positives and negatives for at least 99% of roots. DP=2: the roots are split over two
    replicas and the shards merge into the same bytes."""
    w, sets = loop_run
    tp = 2 if layout == "tp2" else 1
    rc, log = _torchrun_cli(
        2,
        "run",
        *sets,
        *_sets(
            *LOOP_SETS, "loop.stages=1", f"loop.preset={layout}", f"parallel.tensor_parallel={tp}"
        ),
    )
    assert rc == 0, log[-4000:]
    ref_dir = w / "runs" / "policylong" / "stage_0"
    got_dir = w / "runs" / layout / "stage_0"
    ref, got = _provenance(ref_dir), _provenance(got_dir)
    assert [r["root"] for r in got] == [r["root"] for r in ref]
    same = 0
    for a, b in zip(got, ref):
        assert a["high_entropy"]["positions"] == b["high_entropy"]["positions"], a["root"]
        diff = np.abs(np.subtract(a["high_entropy"]["entropy"], b["high_entropy"]["entropy"]))
        assert diff.max(initial=0) <= 1e-4 + 1e-4, (a["root"], diff.max())
        pos = lambda r: sorted(p["passage"] for p in r["positives"])  # noqa: E731
        same += pos(a) == pos(b) and sorted(a["negatives"]) == sorted(b["negatives"])
    assert same >= 0.99 * len(ref), (same, len(ref))
    m_ref = json.loads((ref_dir / "manifest.json").read_text())
    m_got = json.loads((got_dir / "manifest.json").read_text())
    if layout == "dp2":
        assert m_got["sha256"] == m_ref["sha256"]
    assert not list((w / "runs" / layout).glob("*.partial"))
    # training ran on the 2-rank layout: the first loss equals the single process's
    first = lambda d: json.loads((d / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    assert (
        abs(
            first(w / "runs" / layout / "ckpt_1")["loss"]
            - first(w / "runs" / "policylong" / "ckpt_1")["loss"]
        )
        < 1e-5
    )


def _weights(ckpt, out):
    from safetensors.torch import load_file

    rc, log = _cli("export", "--ckpt", ckpt, "--hf-out", out)
    assert rc == 0, log[-3000:]
    t = {}
    for f in sorted(out.glob("*.safetensors")):
        t.update(load_file(str(f)))
    return t


def test_loop_killed_anywhere_resumes_to_the_same_result(loop_run, tmp_path):
    """`policylong run` SIGKILLed during screening (after a batch is on disk), during training
    (after step 3 of 4; the last save was step 2), between stages (stage done, not yet recorded)
    and during stage 1's screening; each rerun resumes where it stopped. The result equals the
    uninterrupted run: stage datasets by sha256, losses of every step, final weights."""
    import torch

    w, sets = loop_run
    loop = sets + _sets(*LOOP_SETS, "loop.preset=killed")
    runs = w / "runs" / "killed"
    for fault in ("screen:0:0", "train:0:3", "stage:0", "screen:1:0", "train:1:1"):
        rc, log = _cli("run", *loop, env_extra={"POLICYLONG_FAULT": fault})
        assert rc != 0, (fault, log[-2000:])
        assert f"killing this process at {fault}" in log or fault.startswith("train"), log[-2000:]
    assert (runs / "stage_1").is_dir() and not (
        runs / "ckpt_2" / "latest_checkpointed_iteration.txt"
    ).exists()
    rc, log = _cli("run", *loop)
    assert rc == 0, log[-4000:]
    ref = w / "runs" / "policylong"
    for t in (0, 1):
        a = json.loads((runs / f"stage_{t}" / "manifest.json").read_text())
        b = json.loads((ref / f"stage_{t}" / "manifest.json").read_text())
        assert a["sha256"] == b["sha256"], t
        la = [json.loads(x)["loss"] for x in (runs / f"ckpt_{t + 1}" / "metrics.jsonl").open()]
        lb = [json.loads(x)["loss"] for x in (ref / f"ckpt_{t + 1}" / "metrics.jsonl").open()]
        assert len(la) == 4 and np.allclose(la, lb, rtol=0, atol=1e-6), (t, la, lb)
    wa, wb = _weights(runs / "ckpt_2", tmp_path / "a"), _weights(ref / "ckpt_2", tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6), k
    assert len(json.loads((runs / "loop.json").read_text())) == 2


def test_recipe_hook_in_a_pretrain_gpt_style_script(loop_run, tmp_path):
    """examples/pretrain_gpt_policylong.py (its own model, optimizer and loop; the stage loop
    through recipe.StageHook; the public ``step.train_step``) under torchrun with DP=2: stage 0,
    screened by the live model before any step, has the bytes of `policylong run`'s stage 0;
    stage 1 is screened by the model after stage 0's steps, on disjoint roots.

    Stage 0's steps equal `policylong run`'s (its ckpt_1/metrics.jsonl, one process): same
    start model, same stage bytes, same seed and sample count (so the same GPTDataset order),
    and a learning-rate schedule of the same length (``--lr-decay-steps`` = the loop's
    train.train_steps); the same ``train_step`` gives the same lr, and the same losses and
    gradient norms up to the DP=2 vs DP=1 reduction order. Stage 1 is not compared: the
    script keeps one optimizer over both stages (Adam moments, lr at min_lr after the decay),
    the loop starts a fresh one per stage, and the two stage-1 datasets are screened by models
    that differ in rounding."""
    w, sets = loop_run
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    metrics = tmp_path / "m.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={_free_port()}",
        os.path.join(root, "examples", "pretrain_gpt_policylong.py"),
        "--workdir",
        str(w),
        "--steps-per-stage",
        "4",
        "--lr-decay-steps",
        "4",
        "--metrics",
        str(metrics),
        *map(str, _sets("data.seq_length=512", *LOOP_SETS, "loop.preset=recipe")),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile("w+") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=900)
        log.seek(0)
        out = log.read()
    assert r.returncode == 0, out[-4000:]
    runs = w / "runs"
    m = {
        (p, t): json.loads((runs / p / f"stage_{t}" / "manifest.json").read_text())
        for p in ("recipe", "policylong")
        for t in (0, 1)
    }
    assert m["recipe", 0]["sha256"] == m["policylong", 0]["sha256"]
    assert m["recipe", 1]["model"] == "live model before stage 1"
    roots = [{p["root"] for p in _provenance(runs / "recipe" / f"stage_{t}")} for t in (0, 1)]
    assert roots[0] and roots[1] and not roots[0] & roots[1]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(s // 5, s) for s in range(1, 9)]
    assert all(np.isfinite(r["loss"]) for r in rows)
    loop = [json.loads(x) for x in (runs / "policylong" / "ckpt_1" / "metrics.jsonl").open()]
    assert [x["step"] for x in loop] == [1, 2, 3, 4]
    got = rows[:4]
    assert [x["lr"] for x in got] == [x["lr"] for x in loop]
    assert np.allclose([x["loss"] for x in got], [x["loss"] for x in loop], rtol=0, atol=1e-5), (
        got,
        loop,
    )
    assert np.allclose(
        [x["grad_norm"] for x in got], [x["grad_norm"] for x in loop], rtol=1e-4, atol=0
    ), (got, loop)
    assert all(x["lr"] == 1e-5 for x in rows[4:])  # past the decay: train.min_lr


def _hf_nll_entropy(model_dir, seqs):
    """Per sequence: float64 next-token NLL and entropy from a Hugging Face forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from policylong.paths import resolve_model_path

    m = AutoModelForCausalLM.from_pretrained(resolve_model_path(str(model_dir))).double().eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            lp = torch.log_softmax(m(x).logits[0].double(), -1)
            nll = -lp[:-1].gather(1, x[0, 1:, None])[:, 0]
            ent = -(lp.exp() * lp).sum(-1)
            out.append((nll, ent))
    return out


def test_report_matches_hugging_face_reference(loop_run, tmp_path):
    """`policylong report` on a finished run: the Fig. 3 losses Loss(M_0) and Loss(M_1) on the
    stage-1 data and the entropy landscape of M_0 equal float64 Hugging Face forwards (M_1
    exported to HF) within 1e-4; the JSON and the PNG plots are written."""
    from policylong.corpus import encode, load_tokenizer, read_documents
    from policylong.paths import resolve_model_path
    from policylong.screening.positions import select_positions

    w, sets = loop_run
    rc, log = _cli("report", *sets, "--presets", "policylong", "--lengths", 128, 256, "--n", 4)
    assert rc == 0, log[-4000:]
    rep = json.loads((w / "report" / "report.json").read_text())
    own = w / "runs" / "policylong" / "report"
    assert json.loads((own / "report.json").read_text())["stages"][1]["difficulty"]
    for name in ("landscape", "difficulty", "probes", "train_loss", "screening"):
        assert (w / "report" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (own / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    st = rep["runs"]["policylong"]["stages"]
    assert [s["stage"] for s in st] == [0, 1] and "difficulty" not in st[0]
    # independent reading of stage 1's tokens: data.bin as raw integers
    man = json.loads((w / "runs" / "policylong" / "stage_1" / "manifest.json").read_text())
    raw = np.fromfile(w / "runs" / "policylong" / "stage_1" / "data.bin", dtype=man["dtype"])
    seqs = raw.reshape(man["num_sequences"], man["seq_length"]).astype(np.int64).tolist()
    rc, log = _cli(
        "export", "--ckpt", w / "runs" / "policylong" / "ckpt_1", "--hf-out", tmp_path / "m1"
    )
    assert rc == 0, log[-3000:]
    for model_dir, key in (("embedded", "loss_M0"), (tmp_path / "m1", "loss_Mt")):
        ref = float(torch_cat([n for n, _ in _hf_nll_entropy(model_dir, seqs)]).mean())
        assert abs(st[1]["difficulty"][key] - ref) < 1e-4, (key, st[1]["difficulty"][key], ref)
    # landscape of M_0: entropy at its own top-5% positions of the held-out roots
    tok = load_tokenizer(resolve_model_path("embedded"))
    docs = {d.id: d.text for d in read_documents(str(w / "corpus" / "docs.jsonl"))}
    ctx = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    roots = [[ctx] + encode(tok, docs[r])[:256] for r in rep["heldout_roots"]]
    assert len(roots) == 4  # 24 documents, 2 stages x 10 roots
    means = []
    for (_, ent), r in zip(_hf_nll_entropy("embedded", roots), roots):
        h = ent[: len(r) - 1].float()  # row i predicts root token i
        pos = select_positions(h, "percentile", 5.0, 2.0, 1 << 30)
        means.append(float(h[pos].double().mean()))
    assert np.allclose(rep["models"]["M_0"]["landscape"], means, rtol=0, atol=1e-4)


def torch_cat(xs):
    import torch

    return torch.cat(xs)


def test_overlapped_screening_uses_the_mid_stage_checkpoint(loop_run, tmp_path):
    """loop.overlap (paper App. E): stage 1 is screened by a second process while stage 0
    trains, with stage 0's save at half its steps (iteration 2 of 4); the manifest records the
    staleness, and the data equals what `policylong screen` writes with that checkpoint
    (`CKPT@2`) afterwards."""
    w, sets = loop_run
    rc, log = _cli(
        "run",
        *sets,
        *_sets(*LOOP_SETS, "loop.preset=overlap", "loop.overlap=true"),
        "--stages",
        2,
        "--roots-per-stage",
        10,
    )
    assert rc == 0, log[-4000:]
    runs = w / "runs" / "overlap"
    m1 = json.loads((runs / "stage_1" / "manifest.json").read_text())
    assert m1["staleness"] == {
        "checkpoint": str(runs / "ckpt_1"),
        "iteration": 2,
        "stage_steps": 4,
        "steps_behind": 2,
    }
    assert m1["model"] == f"{runs / 'ckpt_1'}@2"
    assert (runs / "ckpt_2" / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert "screening in a second process" in log
    ref = _screen_manifest(
        tmp_path / "s1",
        f"{runs / 'ckpt_1'}@2",
        1,
        *sets,
        *_sets("data.root_offset=10", "data.num_roots=10"),
    )
    assert ref["sha256"] == m1["sha256"]
    # stage 0 is not affected by the overlap
    m0 = json.loads((runs / "stage_0" / "manifest.json").read_text())
    p0 = json.loads((w / "runs" / "policylong" / "stage_0" / "manifest.json").read_text())
    assert m0["sha256"] == p0["sha256"]
