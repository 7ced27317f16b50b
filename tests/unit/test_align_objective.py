"""The dGRPO objective against independent float64 references (numpy, or enumeration of a small
vocabulary), and its configuration: presets load, bad values name the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from policylong.align import (
    aggregate,
    clipped_policy_loss,
    dgrpo_loss,
    group_advantages,
    kl_estimate,
    teacher_advantage,
    truncated_is_weight,
)
from policylong.config import AlignConfig, Config, load_config

F64 = torch.float64


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


# -- group advantages --------------------------------------------------------------------------


def _np_advantages(r: np.ndarray, normalize_std: bool, eps: float = 1e-6) -> np.ndarray:
    out = np.zeros_like(r)
    for i, row in enumerate(r):
        if np.all(row == row[0]):
            continue
        centred = row - row.mean()
        out[i] = centred / (row.std(ddof=1) + eps) if normalize_std else centred
    return out


@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_match_numpy(normalize_std):
    rng = np.random.default_rng(0)
    r = np.concatenate(
        [
            [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.1] * 4],
            rng.random((3, 4)),
        ]
    )
    adv, zero_var = group_advantages(torch.tensor(r), normalize_std)
    np.testing.assert_allclose(adv.numpy(), _np_advantages(r, normalize_std), rtol=1e-12)
    assert zero_var.tolist() == [False, True, True, True, False, False, False]
    assert (adv[1:4] == 0).all()  # exactly 0, no rounding residue (0.1 * 4 is not exact)
    if normalize_std:  # GRPO: a binary group [1, 0, 0, 1] gives +-sqrt(3)/2 (unbiased std)
        want = np.array([1.0, -1.0, -1.0, 1.0]) * 0.5 / (np.sqrt(1 / 3) + 1e-6)
        np.testing.assert_allclose(adv[0].numpy(), want, rtol=1e-12)
        assert abs(adv[0, 0] - math.sqrt(3) / 2) < 1e-5


def test_group_advantages_refuse_a_group_of_one():
    with pytest.raises(ValueError, match="G = 1"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        group_advantages(torch.zeros(4))


# -- the KL estimators, by enumeration -----------------------------------------------------------

V = 7


def _dists():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(V, generator=g, dtype=F64)
    logp_t = torch.log_softmax(torch.randn(V, generator=g, dtype=F64) * 1.5, -1)
    return theta, logp_t


def _enumerated(kind: str):
    """(E_{y~π}[k(y)], E_{y~π}[∇_θ k(y)]): the sample held fixed, as a loss on sampled tokens
    is, and the expectation exact by summing over the vocabulary."""
    theta, logp_t = _dists()
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    value = torch.zeros((), dtype=F64)
    grad = torch.zeros(V, dtype=F64)
    for y in range(V):
        k = kl_estimate(logp[y], logp_t[y], kind)
        (g,) = torch.autograd.grad(k, theta, retain_graph=True)
        value += pi[y] * k.detach()
        grad += pi[y] * g
    return value, grad


def _kl_and_grads():
    """KL(π‖π_T), ∇_θ KL(π‖π_T) and ∇_θ KL(π_T‖π), exact."""
    theta, logp_t = _dists()
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    reverse = (logp.exp() * (logp - logp_t)).sum()
    forward = (logp_t.exp() * (logp_t - logp)).sum()
    (g_rev,) = torch.autograd.grad(reverse, theta, retain_graph=True)
    (g_fwd,) = torch.autograd.grad(forward, theta)
    return reverse.detach(), g_rev, g_fwd


def test_k1_has_zero_expected_gradient_and_the_kl_as_its_value():
    kl, g_rev, _ = _kl_and_grads()
    value, grad = _enumerated("k1")
    torch.testing.assert_close(value, kl, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, torch.zeros(V, dtype=F64), rtol=0, atol=1e-15)
    assert g_rev.abs().max() > 0.05  # the KL does move: k1 as a loss misses it


def test_k2_gives_the_reverse_kl_gradient():
    kl, g_rev, g_fwd = _kl_and_grads()
    value, grad = _enumerated("k2")
    torch.testing.assert_close(grad, g_rev, rtol=1e-12, atol=1e-15)
    assert (grad - g_fwd).abs().max() > 0.05  # and not the forward one
    assert value > 0 and not math.isclose(value, kl, rel_tol=1e-3)  # a biased value


def test_k3_gives_the_forward_kl_gradient_and_the_kl_as_its_value():
    kl, g_rev, g_fwd = _kl_and_grads()
    value, grad = _enumerated("k3")
    torch.testing.assert_close(value, kl, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, g_fwd, rtol=1e-12, atol=1e-15)
    assert (grad - g_rev).abs().max() > 0.05  # and not the reverse one


def test_k2_and_k3_are_nonnegative_and_zero_on_agreement():
    d = torch.arange(-60, 61, dtype=F64) / 10
    for kind in ("k2", "k3"):
        k = kl_estimate(d, torch.zeros_like(d), kind)
        assert (k >= 0).all() and k[60] == 0
    np.testing.assert_allclose(
        kl_estimate(d, torch.zeros_like(d), "k3").numpy(), np.exp(-d.numpy()) - 1 + d.numpy()
    )
    with pytest.raises(ValueError, match="'k4'"):
        kl_estimate(d, d, "k4")


# -- the clipped policy loss ---------------------------------------------------------------------

# ratio, advantage, loss, d loss / d logp, clipped   (clip_low 0.2, clip_high 0.28)
CASES = [
    (1.1, 2.0, -2.2, -2.2, False),  # inside the range
    (1.5, 1.0, -1.28, 0.0, True),  # above 1 + eps_high, A > 0: clipped
    (1.5, -1.0, 1.5, 1.5, False),  # above, A < 0: the unclipped (worse) branch
    (0.5, -1.0, 0.8, 0.0, True),  # below 1 - eps_low, A < 0: clipped
    (0.5, 1.0, -0.5, -0.5, False),  # below, A > 0: unclipped
    (0.9, -1.0, 0.9, 0.9, False),
    (2.0, 0.0, 0.0, 0.0, False),  # no advantage: no gradient, not counted as clipped
]


def test_clipped_loss_on_hand_built_ratios():
    ratio, adv, want, want_grad, want_clip = (torch.tensor(c, dtype=F64) for c in zip(*CASES))
    logp = torch.log(ratio).requires_grad_(True)
    loss, clipped = clipped_policy_loss(logp, torch.zeros_like(logp), adv, 0.2, 0.28)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=1e-15)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert clipped.tolist() == want_clip.bool().tolist()
    assert float(clipped.double().mean()) == pytest.approx(2 / 7)

    w = torch.linspace(0.5, 2.0, len(CASES), dtype=F64)
    loss_w, _ = clipped_policy_loss(logp, torch.zeros_like(logp), adv, 0.2, 0.28, w)
    torch.testing.assert_close(loss_w.detach(), want * w, rtol=1e-12, atol=1e-15)


def test_truncated_is_weight():
    lt = torch.log(torch.tensor([0.5, 1.0, 3.0, 10.0], dtype=F64))
    w, capped = truncated_is_weight(lt, torch.zeros_like(lt), 2.0)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0, 2.0, 2.0], dtype=F64))
    assert capped.tolist() == [False, False, True, True] and not w.requires_grad


def test_teacher_advantage_shifts_by_the_log_ratio():
    adv = torch.tensor([[1.0], [-0.5]], dtype=F64)
    lt = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=F64)
    lo = torch.tensor([[-1.5, -1.0], [-0.5, -1.0]], dtype=F64)
    out = teacher_advantage(adv, lt, lo, 0.5)
    torch.testing.assert_close(out, torch.tensor([[1.25, 0.5], [-0.5, -1.5]], dtype=F64))


# -- aggregation ---------------------------------------------------------------------------------


def test_aggregation_on_ragged_masks():
    x = torch.arange(12, dtype=F64).reshape(3, 4).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert float(aggregate(x, mask, "token-mean").detach()) == pytest.approx(
        (0 + 1 + 2 + 3 + 4) / 5
    )
    assert float(aggregate(x, mask, "seq-mean").detach()) == pytest.approx((1.5 + 4) / 2)
    (g,) = torch.autograd.grad(aggregate(x, mask, "seq-mean"), x)
    assert g[0].tolist() == [0.125] * 4 and g[1].tolist() == [0.5, 0, 0, 0] and not g[2].any()
    empty = aggregate(x, torch.zeros_like(mask), "token-mean")
    assert float(empty.detach()) == 0 and empty.requires_grad
    with pytest.raises(ValueError, match="'sum'"):
        aggregate(x, mask, "sum")


# -- dgrpo_loss ----------------------------------------------------------------------------------

P, G, T = 3, 4, 5


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(P * G, T, generator=g, dtype=F64) * 3
    logp = (logp_old + 0.4 * torch.randn(P * G, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    logp_t = -torch.rand(P * G, T, generator=g, dtype=F64) * 3
    lengths = torch.randint(1, T + 1, (P * G,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.2, 0.9, 0.4, 0.0]])
    return logp.requires_grad_(True), logp_old, logp_t, mask, rewards.to(F64)


def _cfg(**kw) -> AlignConfig:
    return AlignConfig(**kw)


def _np_grpo(logp, logp_old, adv_tok, mask, lo=0.2, hi=0.28):
    """The clipped token-mean policy loss in numpy float64."""
    r = np.exp(logp - logp_old)
    loss = -np.minimum(r * adv_tok, np.clip(r, 1 - lo, 1 + hi) * adv_tok)
    return (loss * mask).sum() / mask.sum()


def test_grpo_loss_matches_numpy_and_ignores_the_teacher_at_beta_zero():
    logp, lo, lt, mask, rewards = _batch()
    adv = _np_advantages(rewards.numpy(), True).reshape(P * G, 1)
    want = _np_grpo(logp.detach().numpy(), lo.numpy(), adv, mask.numpy())
    loss, m = dgrpo_loss(_cfg(), logp, mask, rewards, lo)
    assert _f(loss) == pytest.approx(want, rel=1e-12)
    with_teacher, _ = dgrpo_loss(
        _cfg(teacher="/t", teacher_coef=0.0), logp, mask, rewards, lo, logp_teacher=lt
    )
    assert _f(with_teacher) == _f(loss)
    assert m["zero_variance_frac"] == pytest.approx(1 / 3) and 0 <= m["clip_frac"] <= 1


def test_reward_weight_zero_is_pure_opd():
    logp, lo, lt, mask, rewards = _batch()
    cfg = _cfg(teacher="/t", reward_weight=0.0, teacher_coef=0.7, kl_estimator="k2")
    loss, m = dgrpo_loss(cfg, logp, mask, rewards, lo, logp_teacher=lt)
    d = (logp.detach() - lt).numpy()
    want = 0.7 * (0.5 * d * d * mask.numpy()).sum() / mask.sum().item()
    assert _f(loss) == pytest.approx(want, rel=1e-12) and m["pg_loss"] == 0
    # its gradient is that of the teacher term alone
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, 0.7 * (logp.detach() - lt) * mask / mask.sum())
    # one rollout per prompt is enough without group advantages
    l1, _ = dgrpo_loss(cfg, logp, mask, rewards.reshape(P * G, 1), lo, logp_teacher=lt)
    assert _f(l1) == pytest.approx(want, rel=1e-12)


def test_teacher_as_advantage_shifts_the_advantages():
    logp, lo, lt, mask, rewards = _batch()
    cfg = _cfg(teacher="/t", teacher_form="advantage", teacher_coef=0.3)
    adv = _np_advantages(rewards.numpy(), True).reshape(P * G, 1)
    adv_tok = adv + 0.3 * (lt.numpy() - lo.numpy())
    want = _np_grpo(logp.detach().numpy(), lo.numpy(), adv_tok, mask.numpy())
    loss, m = dgrpo_loss(cfg, logp, mask, rewards, lo, logp_teacher=lt)
    assert _f(loss) == pytest.approx(want, rel=1e-12)
    assert m["advantage"] == pytest.approx((adv_tok * mask.numpy()).sum() / mask.sum().item())


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_teacher_loss_full_and_reference_terms_add_up(aggregation):
    logp, lo, lt, mask, rewards = _batch(1)
    kl = (logp - lt).abs() * 2  # any per-token tensor with a graph stands in for the head's KL
    lref = lo - 0.1
    base, _ = dgrpo_loss(_cfg(aggregation=aggregation), logp, mask, rewards, lo)

    def agg(x):
        return float(aggregate(x.detach(), mask, aggregation))

    cases = [
        (dict(teacher_form="loss", kl_estimator="k3"), agg(kl_estimate(logp, lt, "k3"))),
        (dict(teacher_form="full"), agg(kl)),
    ]
    for kw, term in cases:
        cfg = _cfg(aggregation=aggregation, teacher="/t", teacher_coef=0.5, **kw)
        loss, m = dgrpo_loss(cfg, logp, mask, rewards, lo, logp_teacher=lt, kl=kl)
        assert _f(loss) == pytest.approx(_f(base) + 0.5 * term, rel=1e-12)
        assert m["teacher_loss"] == pytest.approx(term, rel=1e-12)
    cfg = _cfg(aggregation=aggregation, ref_coef=0.2)
    loss, m = dgrpo_loss(cfg, logp, mask, rewards, lo, logp_ref=lref)
    ref = agg(kl_estimate(logp, lref, "k3"))
    assert _f(loss) == pytest.approx(_f(base) + 0.2 * ref, rel=1e-12)
    assert m["kl_ref"] == pytest.approx(ref, rel=1e-12)


def test_truncated_importance_sampling_and_skipped_groups():
    logp, lo, _, mask, rewards = _batch(2)
    ls = lo - torch.linspace(-1, 1, T, dtype=F64)  # sampler log-probs off by up to 1 nat
    adv = _np_advantages(rewards.numpy(), True).reshape(P * G, 1)
    r = np.exp(logp.detach().numpy() - lo.numpy())
    per = -np.minimum(r * adv, np.clip(r, 0.8, 1.28) * adv)
    w = np.minimum(np.exp(lo.numpy() - ls.numpy()), 2.0)
    mk = mask.numpy()
    loss, m = dgrpo_loss(_cfg(tis_cap=2.0), logp, mask, rewards, lo, logp_sampler=ls)
    assert _f(loss) == pytest.approx((per * w * mk).sum() / mk.sum(), rel=1e-12)
    assert 0 < m["tis_capped_frac"] < 1
    # the all-equal group (prompt 1) leaves the token count of the mean
    keep = mk.copy()
    keep[G : 2 * G] = False
    loss, m = dgrpo_loss(_cfg(skip_zero_variance=True), logp, mask, rewards, lo)
    assert _f(loss) == pytest.approx((per * keep).sum() / keep.sum(), rel=1e-12)


def test_sft_and_kd_objectives():
    logp, _, lt, mask, _ = _batch()
    loss, _ = dgrpo_loss(_cfg(objective="sft", teacher="/t"), logp, mask)
    assert _f(loss) == pytest.approx(-(logp.detach() * mask).sum().item() / mask.sum().item())
    kl = (logp - lt) ** 2
    loss, m = dgrpo_loss(
        _cfg(objective="kd", teacher="/t", aggregation="seq-mean"), logp, mask, kl=kl
    )
    assert _f(loss) == pytest.approx(float(aggregate(kl, mask, "seq-mean").detach()), rel=1e-12)
    with pytest.raises(ValueError, match="needs kl"):
        dgrpo_loss(_cfg(objective="kd", teacher="/t"), logp, mask)


def test_missing_inputs_and_bad_shapes_are_named():
    logp, lo, _, mask, rewards = _batch()
    with pytest.raises(ValueError, match="needs logp_teacher"):
        dgrpo_loss(_cfg(teacher="/t", teacher_coef=1.0), logp, mask, rewards, lo)
    with pytest.raises(ValueError, match="needs logp_ref"):
        dgrpo_loss(_cfg(ref_coef=1.0), logp, mask, rewards, lo)
    with pytest.raises(ValueError, match="needs logp_sampler"):
        dgrpo_loss(_cfg(tis_cap=2.0), logp, mask, rewards, lo)
    with pytest.raises(ValueError, match="needs rewards"):
        dgrpo_loss(_cfg(), logp, mask)
    with pytest.raises(ValueError, match="P·G = 6"):
        dgrpo_loss(_cfg(), logp, mask, rewards[:2, :3])
    with pytest.raises(ValueError, match="G = 1"):
        dgrpo_loss(_cfg(), logp, mask, rewards.reshape(P * G, 1))


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft", "kd", "grpo", "opd", "dgrpo"])
def test_align_presets_load_and_name_their_run(name):
    cfg = load_config(name)
    assert cfg.align.preset == name
    assert cfg.hash() == Config().hash()  # alignment settings never change a stage's bytes


def test_presets_are_the_comparison():
    a = {n: load_config(n).align for n in ("sft", "kd", "grpo", "opd", "dgrpo")}
    assert (a["sft"].objective, a["kd"].objective) == ("sft", "kd")
    assert a["grpo"].teacher_coef == 0 and a["grpo"].reward_weight > 0
    assert a["opd"].reward_weight == 0 and a["opd"].teacher_coef > 0
    assert a["dgrpo"].reward_weight > 0 and a["dgrpo"].teacher_coef > 0


@pytest.mark.parametrize(
    "override,field",
    [
        ("align.group_size=1", "align.group_size"),
        ("align.teacher_coef=-0.1", "align.teacher_coef"),
        ("align.reward_weight=-1", "align.reward_weight"),
        ("align.ref_coef=-1", "align.ref_coef"),
        ("align.clip_low=1.0", "align.clip_low"),
        ("align.clip_high=0", "align.clip_high"),
        ("align.tis_cap=0.5", "align.tis_cap"),
        ("align.temperature=0", "align.temperature"),
        ("align.aggregation=sum", "align.aggregation"),
        ("align.teacher_form=logits", "align.teacher_form"),
        ("align.kl_estimator=k4", "align.kl_estimator"),
        ("align.objective=dpo", "align.objective"),
        ("align.teacher_coef=0.5", "align.teacher"),  # no teacher
        ("align.objective=sft", "align.teacher"),
        ("align.reward_weight=0", "align.teacher_coef"),  # nothing left to learn
        ("align.minibatches=3", "align.minibatches"),  # does not divide 8 prompts
        ("align.preset=a/b", "align.preset"),
    ],
)
def test_bad_align_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"'{field}'".replace(".", r"\.")):
        load_config(None, [override])


def test_align_relations():
    with pytest.raises(ValueError, match=r"'align\.group_size' = 1: group advantages need G >= 2"):
        load_config("dgrpo", ["align.group_size=1"])
    assert load_config("opd", ["align.group_size=1"]).align.group_size == 1  # no groups in OPD
    with pytest.raises(ValueError, match=r"'align\.kl_estimator' = 'k1'.*zero expected"):
        load_config("dgrpo", ["align.kl_estimator=k1"])
    assert load_config("dgrpo", ["align.kl_estimator=k1", "align.teacher_form=advantage"])
    with pytest.raises(ValueError, match=r"'align\.skip_zero_variance'"):
        load_config("opd", ["align.skip_zero_variance=true"])
    with pytest.raises(ValueError, match=r"'align\.ref_estimator' = 'k1'"):
        load_config("grpo", ["align.ref_coef=0.1", "align.ref_estimator=k1"])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
@pytest.mark.parametrize("form", ["loss", "advantage"])
def test_parts_with_the_whole_denominator_sum_to_the_whole(agg, form):
    """What the loop does across micro-batches and data-parallel ranks: advantages computed
    over whole groups (``rollout_advantages``), each part's loss divided by the whole batch's
    count (``denominator``); the parts' losses and gradients add up to the whole batch's."""
    from policylong.align import rollout_advantages

    logp, logp_old, logp_t, mask, rewards = _batch(3)
    cfg = _cfg(teacher="t", teacher_coef=0.3, teacher_form=form, aggregation=agg)
    whole, _ = dgrpo_loss(cfg, logp, mask, rewards, logp_old, logp_teacher=logp_t)
    (g_whole,) = torch.autograd.grad(whole, logp)
    adv = rollout_advantages(cfg, rewards)[0].reshape(-1)
    den = int(mask.sum()) if agg == "token-mean" else int((mask.sum(-1) > 0).sum())
    total, g_parts = 0.0, torch.zeros_like(logp)
    for rows in ([0, 5, 7], [1, 2, 3, 4], [6, 8, 9, 10, 11]):  # cuts through groups
        r = torch.tensor(rows)
        lp = logp.detach()[r].requires_grad_(True)
        part, _ = dgrpo_loss(
            cfg, lp, mask[r], logp_old=logp_old[r], logp_teacher=logp_t[r],
            advantages=adv[r], denominator=den,
        )  # fmt: skip
        (g,) = torch.autograd.grad(part, lp)
        total += float(part)
        g_parts[r] += g
    assert total == pytest.approx(float(whole), rel=1e-12, abs=1e-15)
    assert torch.allclose(g_parts, g_whole, rtol=1e-12, atol=1e-15)
