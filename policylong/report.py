"""Per-stage statistics; planted-dependency recovery against a synthetic ground truth.

``planted_recovery`` scores what screening found against ``ground_truth.jsonl``:

* recall: planted root→passage links recovered as positives, over all planted links of the
  screened roots (a root skipped for lack of positives counts its links as missed);
* precision with the NLL guard (the configured criterion) and with entropy alone
  (positives ∪ rejected_by_guard);
* how many ``wrong_value`` and ``different_entity`` distractors each criterion admitted, over
  how many of them were retrieved as candidates;
* hard negatives: of the planted ``different_entity`` distractors whose true passage was
  recovered, the fraction that ended up among the root's hard negatives.
"""

from __future__ import annotations

import json


def _ratio(a: int, b: int):
    return round(a / b, 4) if b else None


def planted_recovery(records: list[dict], gt_path: str) -> dict:
    gt = {}
    with open(gt_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                o = json.loads(line)
                gt[o["root"]] = o
    links = tp_g = n_g = tp_e = n_e = 0
    admitted = {
        "guard": {"wrong_value": 0, "different_entity": 0},
        "entropy": {"wrong_value": 0, "different_entity": 0},
    }
    retrieved = {"wrong_value": 0, "different_entity": 0}
    hn_hit = hn_total = 0
    roots = 0
    for r in records:
        g = gt.get(r["root"])
        if g is None:
            continue
        roots += 1
        true = set(g["passages"])
        kinds = g.get("distractor_kinds", {})
        links += len(true)
        guard = {p["passage"] for p in r.get("positives", [])}
        ent = guard | set(r.get("rejected_by_guard", []))
        tp_g += len(guard & true)
        n_g += len(guard)
        tp_e += len(ent & true)
        n_e += len(ent)
        for pid in r.get("candidates", []):
            if pid in kinds:
                retrieved[kinds[pid]] += 1
        for name, s in (("guard", guard), ("entropy", ent)):
            for pid in s:
                if pid in kinds:
                    admitted[name][kinds[pid]] += 1
        if r.get("status") == "ok":
            negs = set(r.get("negatives", []))
            for fct in g.get("facts", []):
                if fct["passage"] in guard:
                    hn_total += 1
                    hn_hit += fct["different_entity"] in negs
    return {
        "roots": roots,
        "planted_links": links,
        "recall": _ratio(tp_g, links),
        "precision": _ratio(tp_g, n_g),
        "recall_entropy_only": _ratio(tp_e, links),
        "precision_entropy_only": _ratio(tp_e, n_e),
        "distractors_retrieved": retrieved,
        "admitted_with_guard": admitted["guard"],
        "admitted_entropy_only": admitted["entropy"],
        "wrong_value_admit_rate_guard": _ratio(
            admitted["guard"]["wrong_value"], retrieved["wrong_value"]
        ),
        "wrong_value_admit_rate_entropy_only": _ratio(
            admitted["entropy"]["wrong_value"], retrieved["wrong_value"]
        ),
        "different_entity_admit_rate_guard": _ratio(
            admitted["guard"]["different_entity"], retrieved["different_entity"]
        ),
        "different_entity_admit_rate_entropy_only": _ratio(
            admitted["entropy"]["different_entity"], retrieved["different_entity"]
        ),
        "hard_negative_distractor_recall": _ratio(hn_hit, hn_total),
    }
