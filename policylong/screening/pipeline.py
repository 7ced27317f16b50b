"""The screening pipeline: root documents + model M_t + passage index -> one stage dataset.

Per batch of root documents (docs/design.md, "Screening"):
entropy -> high-entropy positions -> fragment queries -> candidates -> verification ->
negatives -> assembly. Every random choice of root ``j`` draws from
``default_rng([seed, stage, j])``, so a root's sequence does not depend on which other roots
share its batch or on where an interrupted run resumed.

Progress is appended to ``<out>.partial/progress.jsonl``, one line per finished batch of roots
(fsync'ed); a rerun with the same config skips the finished batches. The stage folder appears
only when the dataset, provenance and manifest are complete.

Several processes (``Shard``): the batches still to screen are dealt round-robin over the
data-parallel ranks; each model replica's writer appends to its own
``progress.dp<rank>.jsonl``; once every rank is through, the leader merges all progress files in
batch order into one stage dataset. The batch order, not the rank that screened a batch, fixes
the dataset, so it is byte-identical for any number of ranks (and across a resume with another
number of ranks).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from policylong.config import Config
from policylong.corpus import Document, context_token_id, encode, eos_id, read_documents
from policylong.datasets import commit, load_manifest, sha256_path, write_stage_dataset
from policylong.errors import ModelError, PolicyLongError, ResumeError
from policylong.outputs import check_output, swap_in
from policylong.retrieval import check_embedder
from policylong.synthetic import planted_recovery

from .assemble import CannotFill, assemble
from .entropy import root_entropies
from .negatives import nearest_negatives, onpolicy_negatives, random_fill
from .positions import select_positions
from .retrieve import fragment_text, rank_candidates, root_exclusions
from .verify import verify_root

log = logging.getLogger(__name__)

RESUME_FORMAT = 2
"""Version of the ``.partial`` folder's layout (progress lines, ``state.json``); a partial of
another version is never resumed."""

ROOTS_PER_BATCH = 16
"""Roots per screening batch (one progress line each): small enough that a killed run loses
little, large enough that embedding and FAISS calls are batched."""


VERIFY_ROUNDS = 4
"""Rounds of ``verify_negatives``: on the synthetic corpus a round's replacements are mostly
clean, so later rounds check few passages."""


def _control_rates(records: list[dict], st: list[dict]) -> dict:
    """Acceptance of the random-passage control beside that of the retrieved candidates (both
    by the configured criterion); empty without a control."""
    fwd = sum(s.get("control_forwards", 0) for s in st)
    if not fwd:
        return {}
    acc = sum(s.get("control_accepted", 0) for s in st)
    cand = sum(s.get("candidate_forwards", 0) for s in st)
    pos = sum(len(r.get("positives", [])) for r in records) + sum(
        s.get("positives_dropped_for_length", 0) for s in st
    )
    return {
        "control_forwards": fwd,
        "control_accepted": acc,
        "control_acceptance_rate": round(acc / fwd, 4),
        "candidate_acceptance_rate": round(pos / cand, 4) if cand else None,
    }


def _replaced_counts(ok: list[dict]) -> dict:
    """``negatives_replaced`` by reason, when ``verify_negatives`` ran (else nothing, so the
    manifest keeps its keys)."""
    if not any("replaced_negatives" in r for r in ok):
        return {}
    out = {"false_negative": 0, "contradiction": 0}
    for r in ok:
        for x in r.get("replaced_negatives", []):
            out[x["reason"]] += 1
    return {"negatives_replaced": out}


class ScreeningError(PolicyLongError, ValueError):
    """Input that cannot give a stage dataset (stops before any model work)."""


@dataclass
class Root:
    index: int  # position in the corpus: seeds this root's random choices
    doc: Document
    tokens: list[int]


class Screener:
    """Screens batches of roots with one model against one index."""

    def __init__(self, cfg: Config, lm, index, embedder, tokenizer=None):
        if embedder is not None:
            why = check_embedder(index.meta, embedder, cfg.retrieval.index_dir)
            if why:
                raise ScreeningError(why)
        self.cfg = cfg
        self.sc = cfg.screening
        self.lm = lm
        self.index = index
        self.embedder = embedder
        self.tok = tokenizer if tokenizer is not None else lm.tokenizer
        self.ctx_id = context_token_id(self.tok)
        self.eos = eos_id(self.tok)
        self.pad_id = self.eos
        self.sep = [self.eos] if cfg.data.separator == "eos" else []
        self.L = cfg.data.seq_length
        self._ptok: dict[int, list[int]] = {}
        rng = np.random.default_rng(0)
        sample = rng.choice(len(index), size=min(256, len(index)), replace=False)
        self.mean_len = float(np.mean([len(self.passage_tokens(int(r))) for r in sample]))

    # -- helpers -----------------------------------------------------------------------------
    def passage_tokens(self, row: int) -> list[int]:
        t = self._ptok.get(row)
        if t is None:
            t = encode(self.tok, self.index.texts[row])
            self._ptok[row] = t
        return t

    def cost(self, row: int) -> int:
        return len(self.passage_tokens(row)) + len(self.sep)

    def search(self, vectors: np.ndarray, k: int):
        return self.index.search(vectors, k)

    def root_rng(self, root: Root) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, self.cfg.stage, root.index])

    # -- one batch ---------------------------------------------------------------------------
    def screen_batch(self, roots: list[Root]) -> list[dict]:
        sc = self.sc
        ents = root_entropies(
            self.lm, [r.tokens for r in roots], self.ctx_id, self.pad_id, self.cfg.model.batch_size
        )
        positions = [
            select_positions(
                h, sc.position_mode, sc.percentile, sc.sigma, sc.max_positions, sc.min_context
            )
            for h, _ in ents
        ]
        frags, owner = [], []
        for j, (r, pos) in enumerate(zip(roots, positions)):
            for p in pos.tolist():
                frags.append(fragment_text(self.tok, r.tokens, p, sc.window))
                owner.append(j)
        qv = self.embedder.encode(frags)
        scores, rows = self.search(qv, sc.top_k)
        owner_arr = np.asarray(owner, dtype=np.int64)

        records = []
        for j, r in enumerate(roots):
            h0, nll0 = ents[j]
            pos = positions[j]
            sel = owner_arr == j
            excl = root_exclusions(self.index, r.doc.id)
            cands = rank_candidates(scores[sel], rows[sel], excl, sc.max_candidates)
            rec = {
                "root": r.doc.id,
                "high_entropy": {
                    "positions": pos.tolist(),
                    "entropy": [round(float(h0[i]), 4) for i in pos.tolist()],
                },
                "stats": {
                    "tokens": len(r.tokens),
                    "mean_entropy": float(h0.mean()),
                    "positions": int(pos.numel()),
                    "candidates": len(cands.rows),
                },
            }
            positives, rejected, rejected_rows = [], [], set()
            if sc.verify:
                verdicts = self._verify(r, pos, h0, nll0, cands.rows)
                for v in verdicts:
                    mask = v.by_guard if sc.nll_guard else v.by_entropy
                    if mask.any():
                        idx = torch.nonzero(mask).flatten().tolist()
                        positives.append(
                            {
                                "row": v.row,
                                "passage": self.index.ids[v.row],
                                "positions": [int(pos[i]) for i in idx],
                                "delta_h": [round(float(v.delta_h[i]), 4) for i in idx],
                                "nll_drop": [round(float(v.nll_drop[i]), 4) for i in idx],
                            }
                        )
                    elif sc.nll_guard and v.by_entropy.any():
                        rejected.append(self.index.ids[v.row])
                        rejected_rows.add(v.row)
                rec["stats"]["candidate_forwards"] = len(verdicts)
                if sc.control_passages:
                    ctrl = self._control_rows(r, excl | set(cands.rows))
                    cv = self._verify(r, pos, h0, nll0, ctrl)
                    rec["stats"]["control_forwards"] = len(cv)
                    rec["stats"]["control_accepted"] = sum(v.positive(sc.nll_guard) for v in cv)
            # strongest evidence first; keep the positives that fit in front of A
            positives.sort(key=lambda p: (-max(p["delta_h"]), p["row"]))
            budget = self.L - len(r.tokens) - len(self.sep)
            kept, used = [], 0
            for p in positives:
                c = self.cost(p["row"])
                if used + c <= budget:
                    kept.append(p)
                    used += c
            rec["stats"]["positives_dropped_for_length"] = len(positives) - len(kept)
            rec["positives"] = kept
            rec["rejected_by_guard"] = rejected
            rec["candidates"] = [self.index.ids[c] for c in cands.rows]
            rec["_need"] = budget - used
            # never a negative: a positive (kept or not: it is evidence for A), nor a passage
            # the guard rejected (it lowered A's entropy but made the true token less likely:
            # on the synthetic corpus, the wrong-value twin of a planted fact)
            rec["_exclude"] = sorted(excl | {p["row"] for p in positives} | rejected_rows)
            rec["_qsel"] = np.nonzero(sel)[0].tolist()
            records.append(rec)

        # secondary retrieval for all positives of the batch: one embedding call
        pos_texts = [self.index.texts[p["row"]] for rec in records for p in rec["positives"]]
        pos_vecs = (
            self.embedder.encode(pos_texts) if (pos_texts and sc.negatives == "onpolicy") else None
        )
        off = 0
        out = []
        for j, (r, rec) in enumerate(zip(roots, records)):
            m = len(rec["positives"])
            need, exclude = rec.pop("_need"), set(rec.pop("_exclude"))
            qsel = rec.pop("_qsel")
            out.append(
                self._finish(
                    r,
                    rec,
                    need,
                    exclude,
                    qv[qsel] if len(qsel) else qv[:0],
                    pos_vecs[off : off + m] if pos_vecs is not None else None,
                    ents[j],
                )
            )
            off += m
        return out

    def _finish(self, r: Root, rec: dict, need: int, exclude: set[int], qvecs, pvecs, ent) -> dict:
        sc = self.sc
        rng = self.root_rng(r)
        if sc.verify and not rec["positives"]:
            return self._skip(rec, "no_positives")
        negs, depth = self._negatives(rng, need, exclude, qvecs, pvecs)
        if sc.verify_negatives and negs:
            negs, replaced = self._verified_negatives(
                r, rec, ent, negs, need, exclude, qvecs, pvecs
            )
            rec["replaced_negatives"] = replaced
        chunks = [(p["passage"], self.passage_tokens(p["row"]), True) for p in rec["positives"]]
        chunks += [(self.index.ids[n], self.passage_tokens(n), False) for n in negs]
        try:
            a = assemble(r.doc.id, r.tokens, chunks, self.L, self.sep, rng)
        except CannotFill:
            return self._skip(rec, "cannot_fill")
        for p in rec["positives"]:
            p.pop("row")
        rec.update(
            {"status": "ok", "negatives": a.negatives, "order": a.order, "head_trim": a.head_trim}
        )
        rec["stats"]["depth_k"] = depth
        return rec

    def _verify(self, r: Root, pos, h0, nll0, rows: list[int]):
        """``verify_root`` of passage ``rows`` against root ``r`` at positions ``pos``, by the
        configured criterion (candidates, the random control and checked negatives alike)."""
        sc = self.sc
        return verify_root(
            self.lm,
            r.tokens,
            pos,
            h0,
            nll0,
            rows,
            [self.passage_tokens(c) for c in rows],
            self.ctx_id,
            self.sep,
            self.pad_id,
            self.cfg.model.batch_size,
            sc.tau_pos,
            sc.nll_margin,
        )

    def _control_rows(self, r: Root, exclude: set[int]) -> list[int]:
        """``screening.control_passages`` random passages that are neither the root's own nor
        its candidates, from a stream of their own (the root's draws are unchanged); drawn by
        rejection, so a 10^8-passage index is never permuted."""
        n, want = len(self.index), self.sc.control_passages
        rng = np.random.default_rng([self.cfg.seed, self.cfg.stage, r.index, 0xC0])
        out: list[int] = []
        for _ in range(64):
            if len(out) >= want:
                break
            for c in rng.integers(0, n, size=2 * want).tolist():
                if c not in exclude and c not in out and len(out) < want:
                    out.append(c)
        return out

    def _negatives(self, rng, need: int, exclude: set[int], qvecs, pvecs):
        """Rows filling ``need`` tokens by ``screening.negatives`` (``exclude`` grows by them),
        and the secondary-retrieval depth k (0 for the other methods)."""
        sc = self.sc
        if sc.negatives == "onpolicy":
            return onpolicy_negatives(
                self.search,
                pvecs,
                exclude,
                need,
                self.cost,
                self.mean_len,
                sc.min_negatives_per_positive,
                sc.max_retrieval_depth,
                len(self.index),
            )
        if sc.negatives == "nearest":
            negs = nearest_negatives(
                self.search,
                qvecs,
                exclude,
                need,
                self.cost,
                sc.max_retrieval_depth,
                len(self.index),
            )
            return negs, 0
        if sc.negatives == "random":
            return random_fill(rng, len(self.index), exclude, need, self.cost), 0
        return [], 0

    def _verified_negatives(self, r: Root, rec, ent, negs, need, exclude, qvecs, pvecs):
        """``screening.verify_negatives``: M_t scores each negative at the positives' verified
        positions, as verification scores a candidate; a false negative or a contradiction is
        replaced by the next negative of the same method, for at most ``VERIFY_ROUNDS``
        rounds (a replacement is checked too). Returns (negatives, [{passage, reason}])."""
        sc = self.sc
        h0, nll0 = ent
        pos = torch.tensor(sorted({i for p in rec["positives"] for i in p["positions"]}))
        replaced, rng = [], np.random.default_rng([self.cfg.seed, self.cfg.stage, 7, len(negs)])
        fresh = list(negs)
        for _ in range(VERIFY_ROUNDS):
            verdicts = self._verify(r, pos, h0, nll0, fresh)
            bad = {}
            for v in verdicts:  # a wrong-value twin also lowers ΔH: contradiction comes first
                if (v.nll_drop < -sc.contradiction_margin).any():
                    bad[v.row] = "contradiction"
                elif v.by_entropy.any():
                    bad[v.row] = "false_negative"
            if not bad:
                break
            replaced += [{"passage": self.index.ids[c], "reason": why} for c, why in bad.items()]
            negs = [c for c in negs if c not in bad]
            exclude |= set(bad)
            fresh, _ = self._negatives(rng, need - sum(map(self.cost, negs)), exclude, qvecs, pvecs)
            negs += fresh
            if not fresh:
                break
        return negs, replaced

    @staticmethod
    def _skip(rec: dict, reason: str) -> dict:
        for p in rec.get("positives", []):
            p.pop("row", None)
        rec.update({"status": "skipped", "reason": reason})
        return rec


# -- a whole stage -----------------------------------------------------------------------------


@dataclass
class Shard:
    """Where this process sits in a screening run of several processes (one process: defaults).

    Communication is only ``barrier``; the caller builds it from its own process group, so the
    pipeline holds no distributed state."""

    rank: int = 0
    """Data-parallel rank: the batches of roots still to screen are dealt round-robin by it."""
    size: int = 1
    """Data-parallel degree (number of model replicas screening at once)."""
    writer: bool = True
    """Writes this replica's progress file: exactly one process per replica (with TP/PP, the
    other ranks of the replica run the same forwards but write nothing)."""
    leader: bool = True
    """Merges the progress of all replicas into the stage dataset: exactly one process."""
    barrier: Callable[[], None] = field(default=lambda: None, repr=False)
    """Waits for every process of the run."""

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"Shard.rank = {self.rank} is not in [0, size = {self.size})")
        if self.leader and not (self.writer and self.rank == 0):
            raise ValueError("Shard.leader must be the writer of data-parallel rank 0")


def _progress_name(rank: int) -> str:
    return "progress.jsonl" if rank == 0 else f"progress.dp{rank}.jsonl"


def _read_all_progress(partial: str) -> dict[int, list[dict]]:
    """Finished batches from every replica's progress file (read-only; a torn last line, from a
    killed run, ends that file's good part)."""
    done: dict[int, list[dict]] = {}
    names = sorted(n for n in os.listdir(partial) if n.startswith("progress"))
    for n in names:
        done.update(_read_progress(os.path.join(partial, n), truncate=False))
    return done


def load_roots(cfg: Config, tokenizer) -> tuple[list[Root], dict[str, int]]:
    """The stage's root documents, tokenized and cut to the screening length."""
    path = cfg.path(cfg.corpus.docs)
    docs = read_documents(path, cfg.corpus.id_field, cfg.corpus.text_field)
    lo = cfg.data.root_offset
    hi = len(docs) if cfg.data.num_roots == 0 else lo + cfg.data.num_roots
    if hi > len(docs) or lo >= len(docs):
        raise ScreeningError(
            f"{path}: data.root_offset={lo} + data.num_roots={cfg.data.num_roots} needs "
            f"{hi} documents but the corpus has {len(docs)}"
        )
    sc = cfg.screening
    roots, skipped = [], {"too_short": 0}
    short_ids = []
    for i in range(lo, hi):
        toks = encode(tokenizer, docs[i].text)[: sc.screen_length]
        if len(toks) < sc.min_tokens:
            skipped["too_short"] += 1
            short_ids.append(docs[i].id)
            continue
        roots.append(Root(i, docs[i], toks))
    if short_ids:
        log.warning(
            "%s: %d documents shorter than %d tokens (2*window+1 = %d, min_context+1 = %d, "
            "min_root_tokens = %d) are skipped: %s",
            path,
            len(short_ids),
            sc.min_tokens,
            2 * sc.window + 1,
            sc.min_context + 1,
            sc.min_root_tokens,
            ", ".join(short_ids[:5]) + (" ..." if len(short_ids) > 5 else ""),
        )
    if not roots:
        raise ScreeningError(
            f"{path}: no root document has the {sc.min_tokens} tokens screening needs "
            f"(a query window, screening.window={sc.window}: {2 * sc.window + 1}; a position "
            f"with context, screening.min_context={sc.min_context}: {sc.min_context + 1}; "
            f"screening.min_root_tokens={sc.min_root_tokens})"
        )
    return roots, skipped


def materialize(
    rec: dict, root_tokens: list[int], passage_tokens, L: int, sep: list[int]
) -> list[int]:
    """Rebuild a sequence from its provenance record (what data.bin holds)."""
    prefix = [t for cid in rec["order"][:-1] for t in passage_tokens(cid) + sep]
    toks = prefix[rec["head_trim"] :] + root_tokens + sep
    if len(toks) != L:
        raise AssertionError(f"root {rec['root']}: rebuilt {len(toks)} tokens, not L={L}")
    return toks


def _read_progress(path: str, truncate: bool = True) -> dict[int, list[dict]]:
    done: dict[int, list[dict]] = {}
    if not os.path.isfile(path):
        return done
    good = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                o = json.loads(line)
                done[int(o["batch"])] = o["records"]
                good += len(line)
            except (json.JSONDecodeError, KeyError, ValueError):
                break  # a torn last line from a killed run
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def aggregate_stats(records: list[dict], skipped_short: int, num_roots: int) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    reasons = {"too_short": skipped_short}
    for r in records:
        if r["status"] == "skipped":
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    npos = sum(len(r["positives"]) for r in ok)
    dh = [max(p["delta_h"]) for r in ok for p in r["positives"]]
    st = [r["stats"] for r in records]
    sel_h = [h for r in records for h in r["high_entropy"]["entropy"]]
    return {
        "roots": num_roots,
        "roots_screened": len(records),
        "sequences": len(ok),
        "skipped": reasons,
        "tokens_scored": sum(s["tokens"] for s in st),
        "positions_examined": sum(s["positions"] for s in st),
        "candidates_retrieved": sum(s["candidates"] for s in st),
        "candidate_forwards": sum(s.get("candidate_forwards", 0) for s in st),
        **_control_rates(records, st),
        "positives": npos,
        "positives_all_roots": sum(len(r.get("positives", [])) for r in records),
        "rejected_by_guard": sum(len(r.get("rejected_by_guard", [])) for r in records),
        **_replaced_counts(ok),
        "negatives": sum(len(r["negatives"]) for r in ok),
        "mean_delta_h": round(float(np.mean(dh)), 4) if dh else None,
        "mean_positives_per_sequence": round(npos / len(ok), 3) if ok else None,
        "mean_negatives_per_sequence": (
            round(sum(len(r["negatives"]) for r in ok) / len(ok), 3) if ok else None
        ),
        "mean_depth_k": (
            round(float(np.mean([r["stats"].get("depth_k", 0) for r in ok])), 3) if ok else None
        ),
        "mean_root_entropy": round(float(np.mean([s["mean_entropy"] for s in st])), 4)
        if st
        else None,
        "mean_selected_entropy": round(float(np.mean(sel_h)), 4) if sel_h else None,
    }


_RESUME_INPUTS = {
    "format": "the on-disk format version",
    "config_hash": "the config (its hash)",
    "model": "the model (its weights or checkpoint iteration)",
    "corpus": "the corpus ({path})",
    "index": "the passage index ({path})",
    "roots": "the number of root documents",
}
"""Resume-key field -> the input it stands for, as a ResumeError names it."""


def resume_key(cfg: Config, index, model_id: str, num_roots: int) -> dict:
    """Every input a stage's batches depend on: a ``.partial`` folder is resumed only when
    this is unchanged. The index is identified by what its meta.json records (the sha256 of
    its files), the corpus by the sha256 of its documents."""
    meta = getattr(index, "meta", {}) or {}
    return {
        "format": RESUME_FORMAT,
        "config_hash": cfg.hash(),
        "model": model_id,
        "corpus": sha256_path(cfg.path(cfg.corpus.docs)),
        "index": meta.get("sha256") or meta,
        "roots": num_roots,
        "corpus_path": cfg.path(cfg.corpus.docs),
        "index_path": cfg.path(cfg.retrieval.index_dir),
    }


def changed_inputs(old: dict | None, new: dict) -> list[str]:
    """The inputs (in words, with their paths) whose resume-key entries differ."""
    if not isinstance(old, dict):
        return ["the resume key (state.json is missing or unreadable)"]
    return [
        _RESUME_INPUTS[k].format(path=new.get(f"{k}_path", ""))
        for k in _RESUME_INPUTS
        if old.get(k) != new.get(k)
    ]


def non_finite(stats: dict, prefix: str = "") -> list[str]:
    """The names of the NaN or infinite numbers in ``stats`` (nested dicts and lists)."""
    bad = []
    for k, v in stats.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            bad += non_finite(v, name + ".")
        elif isinstance(v, (list, tuple)):
            bad += [f"{name}[{i}]" for i, x in enumerate(v) if _nonfinite(x)]
        elif _nonfinite(v):
            bad.append(name)
    return bad


def _nonfinite(v) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def check_finite_model(lm, name: str = "the model", probe_len: int = 16) -> None:
    """Model sanity before any screening: the output head's weights and the final hidden
    states of a fixed probe batch (token ids 1..probe_len) are finite. A model with NaN
    weights would otherwise screen to "no positives" (every entropy NaN). The flag is
    all-reduced over the tensor-parallel group (each rank holds a slice of the head)."""
    w = lm.head_weight()
    vocab = int(getattr(lm, "vocab_size", w.shape[0]))
    probe = (torch.arange(probe_len, device=w.device) % max(vocab - 1, 1) + 1).unsqueeze(0)
    with torch.no_grad():
        h = lm.final_hidden(probe)
    ok = torch.tensor(
        [float(torch.isfinite(w).all()), float(torch.isfinite(h).all())], device=w.device
    )
    if lm.tp_group is not None:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN, group=lm.tp_group)
    if ok[0] < 1:
        raise ModelError(f"{name}: the output head's weights hold NaN/inf")
    if ok[1] < 1:
        raise ModelError(
            f"{name}: the hidden states of a probe batch are NaN/inf (the weights hold NaN/inf)"
        )


def screen_stage(
    cfg: Config,
    lm,
    index,
    embedder,
    out_dir: str,
    model_desc: str = "",
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
    on_batch: Callable[[int], None] | None = None,
    extra: dict | None = None,
    model_id: str | None = None,
) -> dict:
    """Screen the configured roots and write the stage dataset to ``out_dir``.

    With ``shard`` (several processes), every process calls this with the same arguments; each
    screens its share of the batches and the leader writes the dataset. Every process returns
    the manifest. ``on_batch(b)`` is called once batch ``b`` is on disk; ``extra`` fields go
    into the manifest; ``model_id`` identifies the model's weights for the resume key (default
    ``model_desc``).

    An existing ``out_dir`` is replaced only with ``overwrite`` and only once the new dataset is
    complete; a ``.partial`` folder is resumed only when every input it was screened from (the
    resume key: config, model, corpus, index, format) is unchanged, else ``ResumeError`` names
    the input (``overwrite`` discards it instead)."""

    sh = shard or Shard()
    replace = check_output(out_dir, "stage", overwrite=overwrite)
    check_finite_model(lm, model_desc or "the model")
    t0 = time.time()
    tok = lm.tokenizer
    roots, skipped = load_roots(cfg, tok)
    screener = Screener(cfg, lm, index, embedder, tok)
    partial = out_dir.rstrip("/") + ".partial"
    chash = cfg.hash()
    state_path = os.path.join(partial, "state.json")
    state = resume_key(cfg, index, model_id or model_desc, len(roots))
    changed = []
    if os.path.isdir(partial):  # every rank decides, from the same files, before any change
        try:
            with open(state_path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError):
            old = None
        changed = changed_inputs(old, state)
        # no key and no finished batch (killed before the key was written, or after the
        # progress was merged): nothing to mix, start over
        nothing_done = old is None and not _read_all_progress(partial)
        if changed and not (overwrite or nothing_done):
            raise ResumeError(
                f"{partial}: left by a run from other inputs ({'; '.join(changed)} "
                "changed); resuming would mix old and new batches. Remove that folder (or "
                "pass --overwrite to `policylong screen`) to screen this stage anew"
            )
    sh.barrier()  # every rank has read the partial folder as it was
    if sh.leader:
        if changed:
            log.warning("%s: %s; starting over", partial, "; ".join(changed))
            shutil.rmtree(partial)
        os.makedirs(partial, exist_ok=True)
        with open(state_path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(state_path + ".tmp", state_path)
    sh.barrier()  # the partial folder is ready
    done = _read_all_progress(partial)
    sh.barrier()  # everyone agrees on what is done before anyone appends
    nb = math.ceil(len(roots) / ROOTS_PER_BATCH)
    todo = [b for b in range(nb) if b not in done][sh.rank :: sh.size]
    if done and sh.leader:
        log.info("resuming %s: %d of %d batches already screened", out_dir, len(done), nb)
    if sh.size > 1 and sh.writer:
        log.info("data-parallel rank %d of %d screens %d batches", sh.rank, sh.size, len(todo))
    mine = sum(len(roots[b * ROOTS_PER_BATCH : (b + 1) * ROOTS_PER_BATCH]) for b in todo)
    bar = tqdm(total=mine, desc=f"screen stage {cfg.stage}", disable=not (progress and sh.writer))
    prog_path = os.path.join(partial, _progress_name(sh.rank))
    if sh.writer and os.path.isfile(prog_path):
        _read_progress(prog_path)  # cut this replica's torn last line before appending
    pf = open(prog_path, "ab") if sh.writer else None
    try:
        for b in todo:
            batch = roots[b * ROOTS_PER_BATCH : (b + 1) * ROOTS_PER_BATCH]
            recs = screener.screen_batch(batch)
            if pf is not None:
                pf.write((json.dumps({"batch": b, "records": recs}) + "\n").encode())
                pf.flush()
                os.fsync(pf.fileno())
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(b)
    finally:
        if pf is not None:
            pf.close()
    bar.close()
    sh.barrier()  # every replica's progress is on disk
    done = _read_all_progress(partial)
    missing = [b for b in range(nb) if b not in done]
    if missing:
        raise RuntimeError(f"{partial}: batches {missing[:5]} were not screened by any rank")
    records = [r for b in range(nb) for r in done[b]]
    stats = aggregate_stats(records, skipped["too_short"], len(roots) + skipped["too_short"])
    bad = non_finite(stats)
    if bad:
        raise ModelError(
            f"stage {cfg.stage}: screening statistics {', '.join(bad)} are not finite (NaN or "
            f"inf): the model's entropies are not numbers; nothing was written to {out_dir}"
        )
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items() if v)
        raise ScreeningError(
            f"stage {cfg.stage}: no sequence could be built from "
            f"{len(records)} roots ({reasons}); the partial results stay in "
            f"{partial}"
        )
    if not sh.leader:
        sh.barrier()  # the leader writes and commits the stage
        return load_manifest(out_dir)
    log.info(
        "screened %d roots: %d sequences, %d positives, %d negatives, skipped %s",
        len(records),
        len(ok),
        stats["positives"],
        stats["negatives"],
        stats["skipped"],
    )

    gt_path = cfg.path(cfg.corpus.ground_truth) if cfg.corpus.ground_truth else None
    if gt_path and os.path.isfile(gt_path):
        stats["ground_truth"] = planted_recovery(records, gt_path)
        log.info("planted dependencies: %s", json.dumps(stats["ground_truth"]))

    root_tok = {r.doc.id: r.tokens for r in roots}
    id_row = index.row

    def ptoks(pid: str) -> list[int]:
        return screener.passage_tokens(id_row[pid])

    provenance = []
    for r in ok:
        p = {
            "root": r["root"],
            "positives": r["positives"],
            "negatives": r["negatives"],
            "order": r["order"],
            "head_trim": r["head_trim"],
            "rejected_by_guard": r["rejected_by_guard"],
            "candidates": r["candidates"],
            "high_entropy": r["high_entropy"],
        }
        if "replaced_negatives" in r:  # only with verify_negatives: other stages keep their bytes
            p["replaced_negatives"] = r["replaced_negatives"]
        provenance.append(p)
    seqs = (
        materialize(r, root_tok[r["root"]], ptoks, cfg.data.seq_length, screener.sep) for r in ok
    )
    manifest = {
        "stage": cfg.stage,
        "model": model_desc,
        "config_hash": chash,
        "seed": cfg.seed,
        "eod": screener.eos,
        "index": os.path.abspath(cfg.path(cfg.retrieval.index_dir)),
        "stats": stats,
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    manifest = write_stage_dataset(
        partial, seqs, provenance, manifest, lm.vocab_size, cfg.data.seq_length
    )
    elapsed = time.time() - t0
    timing = {
        "seconds": round(elapsed, 2),
        "roots_per_s": round(len(records) / elapsed, 3),
        "tokens_scored_per_s": round(stats["tokens_scored"] / elapsed, 1),
    }
    with open(os.path.join(partial, "timing.json"), "w") as f:
        json.dump(timing, f, indent=2)
    for n in os.listdir(partial):
        if n.startswith("progress"):
            os.remove(os.path.join(partial, n))
    os.remove(state_path)
    if replace:
        swap_in(partial, out_dir)
    else:
        commit(partial, out_dir)
    log.info(
        "stage dataset written: %s (%d sequences x %d tokens, %.1fs)",
        out_dir,
        manifest["num_sequences"],
        cfg.data.seq_length,
        elapsed,
    )
    sh.barrier()
    return manifest
