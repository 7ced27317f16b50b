"""`policylong align` on Megatron-Core (CPU, gloo): the step's parallel equivalence, sampling
against full forwards, every preset from a converted checkpoint, kill -9 anywhere + rerun.

The teacher is the embedded model with seeded noise on every weight (same tokenizer, another
distribution), so the teacher terms are non-trivial."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from test_megatron import _cli, torchrun

pytestmark = pytest.mark.distributed

TINY = [
    "align.steps=3",
    "align.prompts_per_step=2",
    "align.group_size=4",
    "align.num_tasks=8",
    "align.task_length=96",
    "align.max_new_tokens=4",
    "align.micro_batch_size=4",
    "align.lr=3e-5",
    "align.save_interval=1",
]


def _sets(*kv):
    return [x for k in kv for x in ("--set", k)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The embedded model, every weight plus 5% of its std in seeded noise, with its
    tokenizer files."""
    from transformers import AutoModelForCausalLM

    from policylong.paths import embedded_model_dir

    src = embedded_model_dir()
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    m.save_pretrained(out)
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(src, f), out)
    return str(out)


@pytest.fixture(scope="module")
def start_ckpt(tmp_path_factory):
    """The embedded model as a PolicyLong Megatron checkpoint (the stage loop's format)."""
    out = tmp_path_factory.mktemp("start") / "ckpt"
    rc, log = _cli("convert", "--hf", "embedded", "--out", out)
    assert rc == 0, log[-3000:]
    return str(out)


def _step(tmp_path, nproc, tp, teacher, form="full", pp=1):
    from policylong.paths import embedded_model_dir

    out = tmp_path / f"step_{nproc}_{tp}_{pp}_{form}.pt"
    torchrun(
        nproc, "align", "--json", out, "--tp", tp, "--pp", pp, "--hf", embedded_model_dir(),
        "--init", teacher, "--form", form,
    )  # fmt: skip
    return torch.load(out)


def _rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return num / sum(float((a[k] ** 2).sum()) for k in a) ** 0.5


def test_step_is_the_same_at_tp2_pp2_and_dp2(teacher, tmp_path):
    """One dGRPO step (teacher form ``full``: the exact KL from sharded teacher heads) on a
    fixed batch: TP = 2 × PP = 2 (vocab 1519 over 2 shards: 760 + 759; one layer per stage,
    KV caches per stage, fixed-shape micro-batches, the tied embedding's gradient all-reduced
    between the stages) and DP = 2 (one prompt per rank, 3-row micro-batches) give the
    one-process loss and HF-layout gradients within 1e-5. The KV-cached
    sampler's log-probs equal a float64 full forward's within 1e-4, a seed reproduces its
    samples, and TP = 2 and PP = 2 sample the same tokens as one process."""
    ref = _step(tmp_path, 1, 1, teacher)
    assert ref["same_seed_same_samples"]
    assert ref["sampler_logprob_max_err"] < 1e-4, ref["sampler_logprob_max_err"]
    assert ref["loss"] > 0 and ref["grad_norm"] > 0
    for nproc, tp, pp in ((4, 2, 2), (2, 1, 1)):
        r = _step(tmp_path, nproc, tp, teacher, pp=pp)
        assert abs(r["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (tp, pp, r["loss"])
        assert r["grads"].keys() == ref["grads"].keys()
        assert _rel(r["grads"], ref["grads"]) < 1e-5, (nproc, tp, pp)
        assert r["sampler_logprob_max_err"] < 1e-4
        assert r["samples"] == ref["samples"], (tp, pp)


def test_every_preset_runs_from_a_converted_checkpoint(start_ckpt, teacher, tmp_path):
    """grpo, dgrpo, opd, sft, kd and gold-sft each run 2 steps from a Megatron checkpoint and
    log finite metrics; the teacher terms show in the rows of the methods that have one, sft /
    kd train on the teacher's responses and gold-sft on the reference answers (which its own
    verifier scores 1)."""
    w = tmp_path / "w"
    out = tmp_path / "presets.json"
    common = [
        f"workdir={w}",
        f"model.path={start_ckpt}",
        f"align.teacher={teacher}",
        *[s for s in TINY if not s.startswith(("align.steps", "align.save"))],
        "align.steps=2",
    ]
    sets = [x for s in common for x in ("--set", s)]
    names = ("grpo", "dgrpo", "opd", "sft", "kd", "gold-sft")
    torchrun(1, "presets", "--json", out, "--presets", ",".join(names), *sets)
    res = json.loads(out.read_text())
    for name in names:
        rows = [json.loads(x) for x in (w / "align" / name / "metrics.jsonl").open()]
        assert [r["step"] for r in rows] == [1, 2], name
        for r in rows:
            assert all(v == v for v in r.values() if isinstance(v, float)), (name, r)
        assert res[name]["steps"] == 2
        assert (w / "align" / name / "ckpt" / "iter_0000002").is_dir()
    assert "kl_teacher" in res["dgrpo"] and "kl_teacher" in res["kd"]
    assert "kl_teacher" not in res["grpo"]
    assert res["sft"]["responses"] == "teacher" and res["kd"]["responses"] == "teacher"
    assert res["gold-sft"]["responses"] == "reference" and res["gold-sft"]["reward"] == 1.0
    assert res["opd"]["zero_variance_frac"] == 1.0  # reward 0: every group has zero variance


def test_align_killed_anywhere_resumes_to_the_same_result(start_ckpt, teacher, tmp_path):
    """`policylong align` SIGKILLed after step 2's rollouts, after step 2's update (before its
    save) and while saving step 3 (shards written, folder not renamed); each rerun resumes
    from the last complete save. Losses, rewards and rollouts of every step and the final
    model and optimizer state equal the uninterrupted run's."""
    base = ["--config", "dgrpo", "--from", start_ckpt, "--teacher", teacher, *_sets(*TINY)]
    ref_w, w = tmp_path / "ref", tmp_path / "killed"
    rc, log = _cli("align", "--workdir", ref_w, *base)
    assert rc == 0, log[-3000:]
    for fault in ("align:rollout:2", "align:step:2", "align:save:3"):
        rc, log = _cli("align", "--workdir", w, *base, env_extra={"POLICYLONG_FAULT": fault})
        assert rc != 0 and f"killing this process at {fault}" in log, (fault, log[-2000:])
    assert (w / "align" / "dgrpo" / "ckpt" / "iter_0000003.partial").is_dir()
    rc, log = _cli("align", "--workdir", w, *base)
    assert rc == 0, log[-3000:]
    run, ref = w / "align" / "dgrpo", ref_w / "align" / "dgrpo"
    keys = ("step", "loss", "reward", "kl_teacher", "entropy", "grad_norm")
    ma = [{k: json.loads(x)[k] for k in keys} for x in (run / "metrics.jsonl").open()]
    mb = [{k: json.loads(x)[k] for k in keys} for x in (ref / "metrics.jsonl").open()]
    assert [m["step"] for m in ma] == [1, 2, 3]
    for x, y in zip(ma, mb):
        for k in keys:
            assert abs(x[k] - y[k]) <= 1e-6 * max(1.0, abs(y[k])), (k, x, y)
    assert (run / "rollouts.jsonl").read_text() == (ref / "rollouts.jsonl").read_text()
    assert (run / "tasks.jsonl").read_bytes() == (ref / "tasks.jsonl").read_bytes()
    wa, wb = _saved(run / "ckpt", tmp_path / "a.pt"), _saved(ref / "ckpt", tmp_path / "b.pt")
    assert wa.keys() == wb.keys() and len(wa) > 20
    for k, v in wa.items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(v, wb[k], rtol=0, atol=1e-6), k


def _saved(ckpt, tmp):
    """Every tensor of the latest dist_checkpointing save (model and optimizer state), read
    with torch.distributed.checkpoint's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    it = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    dcp_to_torch_save(str(ckpt / f"iter_{it:07d}"), str(tmp))
    return torch.load(tmp, weights_only=False)


def test_eval_tasks_matches_hugging_face_greedy_decoding(tmp_path):
    """`policylong eval-tasks` (greedy, KV-cached, on the Megatron model) scores the embedded
    model as Hugging Face's own greedy `generate` does on the same prompts, family by family;
    its held-out loss equals a float64 cross-entropy of Hugging Face's logits on the same
    documents."""
    from transformers import AutoModelForCausalLM

    from policylong.align.rollout import prompt_ids, stop_ids
    from policylong.corpus import load_tokenizer
    from policylong.paths import embedded_model_dir
    from policylong.tasks import generate_tasks, reward

    fams, n, length, seed = ["lookup", "multihop"], 6, 96, 5
    rc, log = _cli(
        "eval-tasks", "--model", "embedded", "--tasks", ",".join(fams), "--lengths", length,
        "--n", n, "--seed", seed, "--max-new", 4, "--retention-n", 3, "--out", tmp_path,
    )  # fmt: skip
    assert rc == 0, log[-3000:]
    res = json.loads((tmp_path / "tasks_eval.json").read_text())["embedded"]
    got = res["tasks"][str(length)]
    assert (tmp_path / "tasks_eval.png").stat().st_size > 0
    d = embedded_model_dir()
    tok = load_tokenizer(d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    recs = generate_tasks(fams, n * len(fams), length, seed, tok)
    stops = sorted(stop_ids(tok, set(fams)))
    acc: dict = {}
    for r in recs:
        ids = torch.tensor([prompt_ids(tok, r, 4096, 4)])
        with torch.no_grad():
            y = hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=stops)
        text = tok.decode(y[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        acc.setdefault(r.task, []).append(reward(r, text))
    for fam in fams:
        assert got[fam]["n"] == len(acc[fam])
        assert got[fam]["accuracy"] == pytest.approx(sum(acc[fam]) / len(acc[fam])), fam
    from policylong.evaluation import heldout_documents

    docs = heldout_documents(tok, 3, seed, max_tokens=4095)
    nll = []
    for doc in docs:
        ids = torch.tensor([[tok.bos_token_id] + doc])
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1].double()
        nll.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    ref = torch.cat(nll)
    ret = res["retention"]
    assert ret["heldout_loss"]["tokens"] == ref.numel()
    assert ret["heldout_loss"]["loss"] == pytest.approx(float(ref.mean()), rel=1e-5)
    assert ret["niah_single"]["n"] == 3 and 0.0 <= ret["niah_single"]["accuracy"] <= 1.0
