"""Fused linear policy head: sampled-token log-prob, entropy and exact KL(student ‖ teacher).

The loss of the alignment loop (docs/design.md, dGRPO) needs, at every response token, the
log-prob of the sampled token, the policy's entropy and, for the ``full`` teacher term, the
exact full-vocabulary reverse KL to the teacher: the "hidden states for the exact KL" path,
where the teacher ships its final hidden states and head instead of logits. Shapes, with
``tp`` the size of ``tp_group`` and ``T`` the temperature::

    z  = hidden [n, d] @ weight [vocab/tp, d]ᵀ / T                      student logits
    zT = teacher_hidden [n, d_T] @ teacher_weight [vocab/tp, d_T]ᵀ / T   teacher logits
    p = softmax(z), q = softmax(zT)     over the FULL vocabulary (all shards of tp_group)
    logp[i] = log p_i(targets[i]),  entropy[i] = −Σ_v p log p,  kl[i] = Σ_v p (log p − log q)

Nothing builds ``[n × vocab]``: logits exist one ``[row_chunk × vocab_chunk]`` tile at a time.
Forward, per row: running partials ``m = max z, s = Σ e, t = Σ e·z, w = Σ e·(z − zT)`` with
``e = exp(z − m)``, and ``mT, sT`` of the teacher; they merge across tiles and shards (max,
then rescaled sums), and ``lse = m + log s``, ``entropy = lse − t/s``,
``kl = w/s − lse + lseT``. Only ``lse, entropy, lseT, kl`` [n] are saved. Backward recomputes
each tile: with ``log p = z − lse``, ``log q = zT − lseT`` and the upstream grads
``gl, gh, gk`` [n],

    dL/dz = gl·(onehot − p) − gh·p (log p + H) + gk·p ((log p − log q) − KL),

divided by ``T``; then ``dhidden += G @ W_tile`` and ``dweight_tile = Gᵀ @ hidden``. Under
tensor parallelism (Megatron's vocab-parallel layout: ``hidden`` replicated, ``weight`` this
rank's vocab shard) each rank returns its shard's weight grad and the full ``dhidden``,
all-reduced (SUM) inside the backward; the caller must not reduce it again. Collectives sit in
the functions that take ``tp_group``; the tile math is local, and has two implementations
(``backend``): the chunked PyTorch functions below (any device, float64 included) and the
Triton kernels of :mod:`.linear_policy_triton` (float32/bf16/fp16; ``auto`` on CUDA), which
return the same partials and gradients to the same collectives.
"""

from __future__ import annotations

import math

import torch

from . import dispatch
from .dispatch import FLOATS, pick_backend, require_triton
from .linear_entropy import ROW_CHUNK, VOCAB_CHUNK
from .linear_policy_triton import policy_grads_triton, policy_partials_triton
from .partials import _rescale, sum_over

INTS = (torch.int64, torch.int32)


def linear_policy_ref(
    hidden, weight, targets, teacher_hidden=None, teacher_weight=None, temperature=1.0
):
    """Float64 (logp, entropy, kl or None) [n] from materialised logits (tests and benchmarks
    only); differentiable, so float64 autograd gives the reference gradients."""
    lp = torch.log_softmax(hidden.double() @ weight.double().T / temperature, -1)
    logp = lp.gather(1, targets.long()[:, None])[:, 0]
    p = lp.exp()
    ent = -(p * lp).sum(-1)
    if teacher_hidden is None:
        return logp, ent, None
    zt = teacher_hidden.double() @ teacher_weight.double().T / temperature
    return logp, ent, (p * (lp - torch.log_softmax(zt, -1))).sum(-1)


# -- local math --------------------------------------------------------------------------------


def _tile(h_rows: torch.Tensor, w_blk: torch.Tensor, inv_t: float) -> torch.Tensor:
    """Logits ``h_rows @ w_blkᵀ / T`` of one tile, in ``w_blk``'s (compute) dtype."""
    return (h_rows.to(w_blk.dtype) @ w_blk.T).mul_(inv_t)


def policy_partials(hidden, weight, th, tw, inv_t, row_chunk, vocab_chunk, cdt):
    """Partials over this shard, [n] each in ``cdt``: student ``(m, s, t)``, ``w`` (rescaled
    like ``s``) and teacher ``(mT, sT)`` (the last three None without a teacher). Row chunks
    outer, so every row's partials are written once (into poisonable buffers); a bf16/fp16
    weight block is cast to ``cdt`` per tile (n / row_chunk times in all)."""
    n, dev = hidden.shape[0], hidden.device
    teacher = th is not None
    names = ("m", "s", "t", "w", "mT", "sT") if teacher else ("m", "s", "t")
    out = {k: dispatch.alloc((n,), dev, cdt) for k in names}
    for rs in range(0, n, row_chunk):
        r = slice(rs, rs + row_chunk)
        rows = hidden[r].shape[0]
        acc = {k: torch.zeros(rows, dtype=cdt, device=dev) for k in names}
        acc["m"].fill_(-math.inf)
        if teacher:
            acc["mT"].fill_(-math.inf)
        for vs in range(0, weight.shape[0], vocab_chunk):
            z = _tile(hidden[r], weight[vs : vs + vocab_chunk].to(cdt), inv_t)
            mz = z.amax(-1)
            m = torch.maximum(acc["m"], mz)
            c = _rescale(acc["m"], m)
            e = torch.exp(z - m[:, None])
            acc["m"], acc["s"] = m, acc["s"] * c + e.sum(-1)
            acc["t"] = acc["t"] * c + (e * z).sum(-1)
            if teacher:
                zt = _tile(th[r], tw[vs : vs + vocab_chunk].to(cdt), inv_t)
                acc["w"] = acc["w"] * c + (e * z.sub_(zt)).sum(-1)
                mt = torch.maximum(acc["mT"], zt.amax(-1))
                ct = _rescale(acc["mT"], mt)
                acc["mT"], acc["sT"] = mt, acc["sT"] * ct + zt.sub_(mt[:, None]).exp_().sum(-1)
        for k in names:
            out[k][r] = acc[k]
    return tuple(out.get(k) for k in ("m", "s", "t", "w", "mT", "sT"))


def target_logit(hidden, weight, targets, vocab_start, inv_t, row_chunk, cdt):
    """``z[i, targets[i]]`` where this shard owns the target, else 0 (summed over the group)."""
    local = targets.long() - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    idx = torch.where(inside, local, torch.zeros_like(local))
    out = torch.zeros(hidden.shape[0], dtype=cdt, device=hidden.device)
    for rs in range(0, hidden.shape[0], row_chunk):
        r = slice(rs, rs + row_chunk)
        out[r] = (hidden[r].to(cdt) * weight[idx[r]].to(cdt)).sum(-1) * inv_t
    return torch.where(inside, out, torch.zeros_like(out))


def policy_grads(saved, coefs, inv_t, vocab_start, row_chunk, vocab_chunk, want_dw):
    """(dhidden [n, d] of this shard's vocabulary in the compute dtype, to be summed over the
    group; dweight [vocab/tp, d] of this shard in ``weight``'s dtype, or None). Vocab blocks
    outer (each dweight block is written once), row chunks inner.

    ``coefs = (gl, a, b, gk)`` [n]: per tile ``G = p·(a + b·log p − gk·log q) + gl·onehot``
    with ``a = −gl − gh·H − gk·KL`` and ``b = gk − gh``, which is the formula of the module
    docstring regrouped; ``gk`` is None when no KL gradient flows."""
    hidden, weight, targets, th, tw, lse, _, lse_t, _ = saved
    gl, a, b, gk = coefs
    n, cdt, dev = hidden.shape[0], lse.dtype, hidden.device
    dh = torch.zeros(hidden.shape, dtype=cdt, device=dev)
    dw = dispatch.alloc(weight.shape, dev, weight.dtype) if want_dw else None
    local = targets.long() - vocab_start
    for vs in range(0, weight.shape[0], vocab_chunk):
        wb = weight[vs : vs + vocab_chunk].to(cdt)
        twb = tw[vs : vs + vocab_chunk].to(cdt) if gk is not None else None
        dwb = torch.zeros(wb.shape, dtype=cdt, device=dev) if want_dw else None
        for rs in range(0, n, row_chunk):
            r = slice(rs, rs + row_chunk)
            lp = _tile(hidden[r], wb, inv_t).sub_(lse[r, None])  # log p
            g = lp * b[r, None]
            g.add_(a[r, None])
            if gk is not None:
                lq = _tile(th[r], twb, inv_t).sub_(lse_t[r, None])
                g.sub_(lq.mul_(gk[r, None]))
            g.mul_(lp.exp_())
            col = local[r] - vs
            hit = ((col >= 0) & (col < wb.shape[0])).nonzero()[:, 0]
            g[hit, col[hit]] += gl[r][hit]
            g.mul_(inv_t)
            dh[r].addmm_(g, wb)
            if want_dw:
                dwb.addmm_(g.T, hidden[r].to(cdt))
        if want_dw:
            dw[vs : vs + vocab_chunk] = dwb
    return dh, dw


# -- collectives: an explicit tp_group, identity without one -----------------------------------


def _world(tp_group) -> int:
    if tp_group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group=tp_group)


def combine_policy_partials(parts, tp_group=None):
    """Merge each rank's shard partials into full-vocabulary ones: one all-reduce MAX of the
    row maxima, one all-reduce SUM of the rescaled sums, [n]-sized both."""
    if _world(tp_group) == 1:
        return parts
    import torch.distributed as dist

    m, s, t, w, mt, st = parts
    teacher = w is not None
    gm = torch.stack([m, mt]) if teacher else m[None].clone()
    dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=tp_group)
    c = _rescale(m, gm[0])
    sums = [s * c, t * c] + ([w * c, st * _rescale(mt, gm[1])] if teacher else [])
    sums = torch.stack(sums)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
    if not teacher:
        return gm[0], sums[0], sums[1], None, None, None
    return gm[0], sums[0], sums[1], sums[2], gm[1], sums[3]


FIELDS = ("hidden dim", "rows", "teacher hidden dim", "temperature", "targets")


def shard_layout(meta, error, tp_group=None):
    """(first vocab id of this shard, full vocab size), after every rank has checked every
    rank's inputs: ``meta = [ok, v_local, *FIELDS values, min target, max target]``. A rank
    with a local ``error`` raises it; the others raise naming that rank, so none waits in a
    collective; shards that disagree (dims, rows, teacher, temperature, targets) or targets
    outside the full vocabulary raise on every rank."""
    size = _world(tp_group)
    if size == 1:
        if error is not None:
            raise error
        allm, rank = [torch.tensor(meta, dtype=torch.float64)], 0
    else:
        import torch.distributed as dist

        mine = torch.tensor(meta, dtype=torch.float64)
        allm = [torch.zeros_like(mine) for _ in range(size)]
        dist.all_gather(allm, mine, group=tp_group)
        rank = dist.get_rank(group=tp_group)
        if error is not None:
            raise error
        bad = [i for i, x in enumerate(allm) if x[0] == 0]
        if bad:
            raise ValueError(
                f"fused_linear_policy: rank(s) {bad} of the tp_group rejected their inputs "
                "(see the error on that rank)"
            )
        for j, name in enumerate(FIELDS):
            vals = [x[2 + j].item() for x in allm]
            if len(set(vals)) != 1:
                raise ValueError(
                    f"fused_linear_policy: the tp_group's shards disagree on {name} "
                    f"(per rank: {vals})"
                )
    vocab = int(sum(x[1].item() for x in allm))
    lo, hi = min(x[-2].item() for x in allm), max(x[-1].item() for x in allm)
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"fused_linear_policy: targets must be in [0, {vocab}) (the full vocabulary of "
            f"the group), got min {int(lo)}, max {int(hi)}"
        )
    return int(sum(x[1].item() for x in allm[:rank])), vocab


# -- checks, the autograd function, the public op ----------------------------------------------


def _local_error(hidden, weight, targets, th, tw, temperature):
    """The first problem with this rank's inputs, as an exception (not raised), or None."""

    def pair(hn, h, wn, w):
        if h.dim() != 2 or w.dim() != 2:
            return ValueError(
                f"{hn} must be [n, d] and {wn} [vocab/tp, d], got shapes "
                f"{tuple(h.shape)} and {tuple(w.shape)}"
            )
        if h.shape[1] != w.shape[1]:
            return ValueError(f"{hn} {tuple(h.shape)} and {wn} {tuple(w.shape)}: dims differ")
        for name, x in ((hn, h), (wn, w)):
            if x.dtype not in FLOATS:
                return TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if h.dtype != w.dtype:
            return TypeError(f"{hn} is {h.dtype} but {wn} is {w.dtype}; cast one to match")
        if h.device != w.device or h.device != hidden.device:
            return ValueError(f"{hn} on {h.device}, {wn} on {w.device}, hidden on {hidden.device}")
        return None

    err = pair("hidden", hidden, "weight", weight)
    if err is None and (th is None) != (tw is None):
        err = ValueError("teacher_hidden and teacher_weight go together (one is None)")
    if err is None and th is not None:
        err = pair("teacher_hidden", th, "teacher_weight", tw)
        if err is None and tw.shape[0] != weight.shape[0]:
            err = ValueError(
                f"teacher_weight {tuple(tw.shape)} and weight {tuple(weight.shape)} must shard "
                "the vocabulary alike (same rows per rank; slice padded rows to match)"
            )
        if err is None and th.shape[0] != hidden.shape[0]:
            err = ValueError(
                f"teacher_hidden {tuple(th.shape)} and hidden "
                f"{tuple(hidden.shape)} must have the same rows"
            )
    if err is None and (hidden.shape[0] == 0 or weight.shape[0] == 0):
        err = ValueError(f"empty input: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if err is None and targets.dtype not in INTS:
        err = TypeError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if err is None and targets.shape != (hidden.shape[0],):
        err = ValueError(f"targets must be [n] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if err is None and targets.device != hidden.device:
        err = ValueError(f"targets on {targets.device} but hidden on {hidden.device}")
    if err is None and not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        err = ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return err


class _LinearPolicy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, th, tw, temperature, tp_group, start, rc, vc, tri):
        ctx.set_materialize_grads(False)
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        inv_t = 1.0 / temperature
        if tri:  # only the local tile math differs; the collectives below are shared
            parts, tl_local = policy_partials_triton(hidden, weight, targets, th, tw, inv_t, start)
        else:
            parts = policy_partials(hidden, weight, th, tw, inv_t, rc, vc, cdt)
            tl_local = target_logit(hidden, weight, targets, start, inv_t, rc, cdt)
        m, s, t, w, mt, st = combine_policy_partials(parts, tp_group)
        tl = sum_over(tl_local, tp_group)
        lse = m + torch.log(s)
        ent = lse - t / s
        if th is None:
            lse_t = kl = None
            kl_out = torch.zeros_like(ent)
            ctx.mark_non_differentiable(kl_out)
        else:
            lse_t = mt + torch.log(st)
            kl = w / s - lse + lse_t
            kl_out = kl
        ctx.save_for_backward(hidden, weight, targets, th, tw, lse, ent, lse_t, kl)
        ctx.cfg = (inv_t, tp_group, start, rc, vc, tri)
        return tl - lse, ent, kl_out

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl):
        saved = ctx.saved_tensors
        hidden, weight, _, th, _, lse, ent, _, kl = saved
        inv_t, tp_group, start, rc, vc, tri = ctx.cfg
        zero = torch.zeros_like(lse)
        gl = zero if g_logp is None else g_logp.to(lse.dtype)
        gh = zero if g_ent is None else g_ent.to(lse.dtype)
        gk = None if (g_kl is None or th is None) else g_kl.to(lse.dtype)
        a = -gl - gh * ent - (0 if gk is None else gk * kl)
        b = -gh if gk is None else gk - gh
        coefs, want_dw = (gl, a, b, gk), ctx.needs_input_grad[1]
        if tri:
            dh, dw = policy_grads_triton(saved, coefs, inv_t, start, want_dw)
        else:
            dh, dw = policy_grads(saved, coefs, inv_t, start, rc, vc, want_dw)
        dh = sum_over(dh, tp_group).to(hidden.dtype)
        return (dh, dw) + (None,) * 9


def _use_triton(hidden, backend: str) -> bool:
    """Whether the Triton kernels run the local math. Float64 stays on the PyTorch path
    (``tl.dot`` has no float64): ``auto`` keeps it there even where POLICYLONG_ENTROPY_BACKEND
    forces ``triton`` (float64 gradchecks under that variable), an explicit
    ``backend='triton'`` raises TypeError."""
    if pick_backend(hidden, backend) != "triton":
        return False
    if backend == "auto" and hidden.dtype == torch.float64:
        return False
    require_triton(hidden)
    return True


def fused_linear_policy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
    tp_group=None,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
    backend: str = "auto",
):
    """``(logp [n], entropy [n], kl [n] or None)`` of the policy head; see the module docstring.

    ``hidden [n, d]``, ``weight [vocab/tp, d]`` (this rank's vocab shard), ``targets [n]``
    (global token ids, int64/int32), optional teacher ``teacher_hidden [n, d_T]`` and
    ``teacher_weight [vocab/tp, d_T]`` (sharded like ``weight``; ``d_T`` may differ from
    ``d``; a constant: no gradient flows into it). Outputs are float32 (float64 for float64
    inputs), the same on every rank of ``tp_group``, differentiable in ``hidden`` and
    ``weight``; ``kl`` is the exact full-vocabulary KL(p ‖ q). Memory beyond inputs, outputs
    and grads: [n] statistics and a few ``[row_chunk, vocab_chunk]`` tiles (Triton: [n]
    partials per vocab split and, for bf16/fp16 weights, a float32 ``[DW_CHUNK, d]`` dweight
    accumulator). Errors (shapes, dtypes, targets outside the full vocabulary, shards of the
    group that disagree) raise on every rank. ``backend``: ``torch`` (the chunked path;
    ``row_chunk`` and ``vocab_chunk`` are its tile), ``triton`` (the kernels of
    :mod:`.linear_policy_triton`: CUDA, or CPU under ``TRITON_INTERPRET=1``; float32/bf16/fp16
    only) or ``auto`` (``triton`` on CUDA for non-float64 inputs, else ``torch``).
    """
    tri = _use_triton(hidden, backend)
    err = _local_error(hidden, weight, targets, teacher_hidden, teacher_weight, temperature)
    meta = [0.0] * (2 + len(FIELDS) + 2)
    if err is None:
        n = hidden.shape[0]
        mix = (targets.long() * (torch.arange(n, device=targets.device) % 7 + 1)).sum()
        dt = -1 if teacher_hidden is None else teacher_hidden.shape[1]
        lo_hi = torch.stack([targets.min(), targets.max()]).tolist()
        meta = [1, weight.shape[0], hidden.shape[1], n, dt, temperature, mix.item(), *lo_hi]
    start, _ = shard_layout(meta, err, tp_group)
    args = (teacher_hidden, teacher_weight, float(temperature), tp_group, start)
    args = args + (row_chunk, vocab_chunk, tri)
    logp, ent, kl = _LinearPolicy.apply(hidden, weight, targets, *args)
    return logp, ent, (None if teacher_hidden is None else kl)
