"""The dGRPO objective: group advantages, clipped policy loss, teacher and reference terms.

Pure functions of per-token tensors (torch, no communication), so one ``AlignConfig`` gives
every method of the comparison: GRPO (``teacher_coef`` 0), OPD (``reward_weight`` 0), dGRPO
(both), SFT and KD (``objective``). Shapes: P prompts, G rollouts each, B = P·G responses in
prompt-major order (row ``p·G + g``), T response positions (right-padded; ``mask`` marks the
response tokens). ``logp*`` are log-probabilities of the sampled tokens: of the policy being
trained (π_θ, with its graph), of the policy that produced the rollouts (π_old), of the teacher
(π_T), of a frozen reference, and of the sampler when it is not the trainer.

The KL estimators on a token y ~ π_θ, with d = log π_θ(y) - log π_T(y): k1 = d, k2 = d²/2,
k3 = exp(-d) - 1 + d. As values, E[k1] = E[k3] = KL(π_θ‖π_T). As losses (the sample held fixed,
which is what a loss on sampled tokens is), the expected gradients are: k1 zero, k2 that of
the reverse KL(π_θ‖π_T), k3 that of the forward KL(π_T‖π_θ). ``tests/unit/
test_align_objective.py`` checks all of it by enumerating a small vocabulary in float64.

On several data-parallel ranks, ``token-mean`` needs the global token count: the loop passes
the local sums through its own reduction; these functions see one rank's tensors.
"""

from __future__ import annotations

import torch

from policylong.config import AlignConfig

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean")


def group_advantages(
    rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of ``rewards[P, G]``: (R - mean_G R) / (std_G R + eps), or
    R - mean_G R without ``normalize_std``; std is the unbiased one (G - 1), as verl and TRL.

    Returns ``(advantages[P, G], zero_variance bool[P])``; a group whose G rewards are all
    equal has advantage exactly 0 (no rounding residue)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    g = rewards.shape[1]
    if not rewards.is_floating_point():
        rewards = rewards.double()
    if g < 2:
        raise ValueError(f"group size G = {g}: group advantages need G >= 2 rollouts per prompt")
    zero_variance = (rewards == rewards[:, :1]).all(dim=1)
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    adv = adv.masked_fill(zero_variance[:, None], 0.0)
    return adv, zero_variance


def kl_estimate(logp: torch.Tensor, logp_teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_T) from the sampled tokens' log-probs ``logp[...]`` (π,
    the sampling policy) and ``logp_teacher[...]`` (π_T); same shape out. With
    d = logp - logp_teacher: ``k1`` = d, ``k2`` = d²/2, ``k3`` = exp(-d) - 1 + d (Schulman's
    estimator: unbiased and >= 0). Gradients flow into both arguments as they require them."""
    d = logp - logp_teacher
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"KL estimator {kind!r}: must be one of {', '.join(KL_ESTIMATORS)}")


def truncated_is_weight(
    logp_trainer: torch.Tensor, logp_sampler: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weight min(π_trainer/π_sampler, cap) per token (no gradient), for
    rollouts whose sampler (other kernels, other precision) is not the trainer.

    Returns ``(weight[...], capped bool[...])``; same shape as the inputs."""
    if not cap > 0:
        raise ValueError(f"truncated importance sampling cap = {cap}: must be > 0")
    ratio = torch.exp(logp_trainer.detach() - logp_sampler.detach())
    return ratio.clamp(max=cap), ratio > cap


def clipped_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    tis_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/DAPO clipped surrogate per token: -min(ρA, clip(ρ, 1 - clip_low, 1 + clip_high)·A)
    with ρ = exp(logp - logp_old), optionally times a (constant) importance weight.

    ``logp[...]`` carries the graph; ``logp_old``, ``advantages`` and ``tis_weight`` (same shape,
    or broadcastable) are constants. Returns ``(loss[...], clipped bool[...])``, ``clipped``
    marking the tokens whose gradient the clip zeroes (ρ > 1 + clip_high with A > 0, or
    ρ < 1 - clip_low with A < 0)."""
    adv = advantages.detach()
    ratio = torch.exp(logp - logp_old.detach())
    surr = ratio * adv
    surr_clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(surr, surr_clipped)
    if tis_weight is not None:
        loss = loss * tis_weight.detach()
    r = ratio.detach()
    clipped = ((r > 1.0 + clip_high) & (adv > 0)) | ((r < 1.0 - clip_low) & (adv < 0))
    return loss, clipped


def teacher_advantage(
    advantages: torch.Tensor, logp_teacher: torch.Tensor, logp_old: torch.Tensor, coef: float
) -> torch.Tensor:
    """Teacher term as an advantage (form ``advantage``): A + coef·(log π_T - log π_old) per
    token, added after group normalisation, without gradient. ``advantages`` is [B, 1] or
    [B, T]; the log-probs are [B, T]; returns [B, T]."""
    return advantages.detach() + coef * (logp_teacher.detach() - logp_old.detach())


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, denominator: float | None = None
) -> torch.Tensor:
    """One number from ``per_token[B, T]`` over the tokens of ``mask[B, T]``: ``token-mean``
    (every masked token of the batch weighs the same) or ``seq-mean`` (mean over each row's
    tokens, then over the rows that have any). 0 (with the graph kept) when nothing is
    masked.

    ``denominator``: divide by this count instead of this batch's own (masked tokens for
    ``token-mean``, non-empty rows for ``seq-mean``). A loop that splits a batch over
    micro-batches and data-parallel ranks passes the count of the whole batch, so the sum of
    the parts is the loss of the whole."""
    m = mask.to(per_token.dtype)
    total = (per_token * m).sum(dim=-1)
    count = m.sum(dim=-1)
    if mode == "token-mean":
        den = count.sum().clamp(min=1) if denominator is None else max(denominator, 1)
        return total.sum() / den
    if mode == "seq-mean":
        rows = count > 0
        per_row = total / count.clamp(min=1)
        den = rows.sum().clamp(min=1) if denominator is None else max(denominator, 1)
        return (per_row * rows).sum() / den
    raise ValueError(f"aggregation {mode!r}: must be one of {', '.join(AGGREGATIONS)}")


def rollout_advantages(cfg: AlignConfig, rewards: torch.Tensor):
    """Group advantages of ``rewards[P, G]`` as ``cfg`` defines them (``reward_weight``,
    ``normalize_std``): ``(advantages[P, G], zero_variance bool[P])``. G = 1 is allowed only
    for pure on-policy distillation (``reward_weight`` 0): advantages are then 0."""
    p, g = rewards.shape
    if g >= 2:
        return group_advantages(cfg.reward_weight * rewards, cfg.normalize_std)
    if cfg.reward_weight > 0:
        group_advantages(rewards, cfg.normalize_std)  # raises, naming G
    zeros = torch.zeros(p, g, dtype=torch.float64, device=rewards.device)
    return zeros, torch.ones(p, dtype=torch.bool, device=rewards.device)


def _need(name: str, t: torch.Tensor | None, why: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"dgrpo_loss: {why} needs {name}")
    return t


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(torch.float64)
    return float((x.detach().to(torch.float64) * m).sum() / m.sum().clamp(min=1))


def dgrpo_loss(
    cfg: AlignConfig,
    logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor | None = None,
    logp_old: torch.Tensor | None = None,
    logp_teacher: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    logp_ref: torch.Tensor | None = None,
    logp_sampler: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one (mini)batch as ``cfg`` defines it, and its metrics.

    ``logp[B, T]``: π_θ of the sampled tokens (with the graph); ``mask[B, T]``: response
    tokens; ``rewards[P, G]`` (B = P·G, prompt-major; ``rl`` only); ``logp_old[B, T]``: π_old
    (default ``logp`` detached: the first step on fresh rollouts); ``logp_teacher[B, T]``
    (forms ``loss`` and ``advantage``); ``kl[B, T]``: the exact full-vocabulary KL(π_θ‖π_T) per
    position, with its graph (form ``full`` and ``kd``; the fused policy head gives it);
    ``logp_ref[B, T]`` (``ref_coef`` > 0); ``logp_sampler[B, T]`` (``tis_cap`` > 0).
    ``advantages[B]``: group advantages computed by the caller over whole groups (a loop
    whose micro-batch holds part of a group; ``rollout_advantages``), used instead of
    ``rewards``; the caller then masks skipped groups itself. ``denominator``: see
    ``aggregate`` (every term is divided by it).

    ``sft``: the NLL of the (teacher's) tokens; ``kd``: ``kl`` on them; ``rl``: the clipped
    policy loss with group advantages of ``reward_weight``·rewards, plus the teacher term of
    ``teacher_form`` and the reference KL. Returns ``(loss scalar, metrics)``."""
    mode = cfg.aggregation

    def agg(x, m):
        return aggregate(x, m, mode, denominator)

    if logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} differ")
    mask = mask.bool()
    metrics: dict[str, float] = {"tokens": float(mask.sum())}
    if cfg.objective == "sft":
        loss = agg(-logp, mask)
        metrics.update(loss=float(loss.detach()), nll=float(loss.detach()))
        return loss, metrics
    if cfg.objective == "kd":
        kl = _need("kl", kl, "objective kd (the full-vocabulary KL per token)")
        loss = agg(kl, mask)
        metrics.update(loss=float(loss.detach()), kl_teacher=_masked_mean(kl, mask))
        return loss, metrics

    logp_old = logp.detach() if logp_old is None else logp_old.detach()
    if advantages is not None:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} rows, logp has {logp.shape[0]}")
        adv = advantages.reshape(-1, 1).to(dtype=logp.dtype, device=logp.device)
    else:
        rewards = _need("rewards", rewards, "objective rl (or advantages)")
        p, g = rewards.shape
        if p * g != logp.shape[0]:
            raise ValueError(
                f"rewards [{p}, {g}] need P·G = {p * g} response rows, logp has {logp.shape[0]}"
            )
        adv, zero_var = rollout_advantages(cfg, rewards)
        adv = adv.reshape(p * g, 1).to(dtype=logp.dtype, device=logp.device)
        if cfg.skip_zero_variance:
            mask = mask & ~zero_var.to(mask.device).repeat_interleave(g)[:, None]
        metrics.update(
            reward=float(rewards.double().mean()),
            zero_variance_frac=float(zero_var.double().mean()),
        )

    beta, form = cfg.teacher_coef, cfg.teacher_form
    if beta > 0 and form == "advantage":
        lt = _need("logp_teacher", logp_teacher, "teacher_form advantage")
        adv = teacher_advantage(adv, lt, logp_old, beta)
    else:
        adv = adv.expand_as(logp)
    tis = None
    if cfg.tis_cap > 0:
        ls = _need("logp_sampler", logp_sampler, "tis_cap > 0")
        tis, capped = truncated_is_weight(logp_old, ls, cfg.tis_cap)
        metrics["tis_capped_frac"] = _masked_mean(capped, mask)
    pg, clipped = clipped_policy_loss(logp, logp_old, adv, cfg.clip_low, cfg.clip_high, tis)
    loss = agg(pg, mask)
    metrics.update(
        pg_loss=float(loss.detach()),
        clip_frac=_masked_mean(clipped, mask),
        advantage=_masked_mean(adv, mask),
    )

    if beta > 0 and form == "loss":
        lt = _need("logp_teacher", logp_teacher, "teacher_form loss")
        term = agg(kl_estimate(logp, lt.detach(), cfg.kl_estimator), mask)
        loss = loss + beta * term
        metrics["teacher_loss"] = float(term.detach())
    elif beta > 0 and form == "full":
        kl = _need("kl", kl, "teacher_form full (the full-vocabulary KL per token)")
        term = agg(kl, mask)
        loss = loss + beta * term
        metrics["teacher_loss"] = float(term.detach())
    if kl is not None:  # the exact KL when there is one, else the k3 estimate (unbiased)
        metrics["kl_teacher"] = _masked_mean(kl, mask)
    elif logp_teacher is not None:
        metrics["kl_teacher"] = _masked_mean(kl_estimate(logp, logp_teacher, "k3"), mask)
    if cfg.ref_coef > 0:
        lr_ = _need("logp_ref", logp_ref, "ref_coef > 0")
        term = agg(kl_estimate(logp, lr_.detach(), cfg.ref_estimator), mask)
        loss = loss + cfg.ref_coef * term
        metrics["kl_ref"] = float(term.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics
