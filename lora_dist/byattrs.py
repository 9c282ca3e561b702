"""E2E scores by the number of attributes per meaning representation, and re-weighted to a mean.

A set of MRs with fewer attributes is easier (fewer slots to realise, shorter outputs), so a
total over one set says little about another with longer MRs: the name split of the E2E
development set averages 5.7 attributes per MR, the official test set 7.0. :func:`by_attributes`
scores each attribute count on its own (BLEU, slot errors), and :func:`reweighted` gives the
totals the same outputs would have had on a set whose mean is ``mean``.

Re-weighting: each MR of count k is weighted q_k / p_k, where p is the observed distribution of
counts and q the distribution closest to it (least Kullback-Leibler divergence) whose mean is
``mean``: q_k proportional to p_k exp(t k), with t found by bisection. Only counts present are
weighted (a count the set lacks cannot be invented), so a mean outside the counts present is
refused, and a mean equal to the largest count present weighs only the MRs of that count. BLEU
is re-weighted through its sufficient statistics (n-gram matches and totals, output and
reference lengths, each MR's weighted), SER through its slot counts.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

TEST_SET_MEAN = 7.0  # attributes per MR, E2E's official test set (issue 32: 100 of its MRs scored)


def _bleu_stats(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> list[list[float]]:
    """Each output's BLEU statistics: [output length, reference length, matches 1-4, totals 1-4]
    (sacrebleu's own, lowercased as ``metrics.e2e_metrics`` scores)."""
    from sacrebleu.metrics import BLEU

    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    return BLEU(lowercase=True)._extract_corpus_statistics(list(hyps), streams)


def _bleu(stats: Sequence[Sequence[float]], weights: Sequence[float]) -> float:
    """Corpus BLEU of weighted statistics: sacrebleu's formula with its default smoothing ('exp'),
    written out because sacrebleu's own takes whole counts only."""
    total = [sum(w * s[i] for s, w in zip(stats, weights)) for i in range(len(stats[0]))]
    sys_len, ref_len, correct, ngrams = total[0], total[1], total[2:6], total[6:10]
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    logs, smooth = [], 1.0
    for c, t in zip(correct, ngrams):
        if t == 0:  # no output this long: the orders after it count as precision 0
            break
        if c == 0:
            smooth *= 2
            p = 100.0 / (smooth * t)
        else:
            p = 100.0 * c / t
        logs.append(math.log(p))
    logs += [-9999999999.0] * (4 - len(logs))  # sacrebleu's log of 0
    return bp * math.exp(sum(logs) / 4)


def _ser(slots: Sequence[dict], weights: Sequence[float]) -> dict[str, float]:
    n = sum(w * s["slots"] for s, w in zip(slots, weights))
    counts = {k: sum(w * len(s[k]) for s, w in zip(slots, weights)) for k in ("missing", "wrong", "added")}
    return {"SER": 100 * sum(counts.values()) / n if n else 0.0, **counts}


def by_attributes(preds: Sequence[str], refs: Sequence[Sequence[str]], slots: Sequence[dict]) -> list[dict]:
    """One row per attribute count present: MRs, BLEU, SER (percent) and its missing / wrong /
    added counts, in order of the count. ``slots`` are ``evaluate``'s per-output slot errors."""
    stats = _bleu_stats(preds, refs)
    rows = []
    for k in sorted({s["slots"] for s in slots}):
        mine = [i for i, s in enumerate(slots) if s["slots"] == k]
        ser = _ser([slots[i] for i in mine], [1.0] * len(mine))
        ser = {key: v if key == "SER" else round(v) for key, v in ser.items()}  # unweighted: whole counts
        rows.append({"attributes": k, "mrs": len(mine), "BLEU": _bleu([stats[i] for i in mine], [1.0] * len(mine)),
                     **ser})
    return rows


def tilted(counts: Sequence[int], mean: float) -> dict[int, float]:
    """The distribution over ``counts``' values closest to their own with mean ``mean``:
    {count: probability}.

    Raises:
        ValueError: ``mean`` is outside the smallest to largest count. At either end the closest
            distribution is all of that count's MRs (the limit of the tilt).
    """
    p = Counter(counts)
    lo, hi = min(p), max(p)
    if lo == hi:
        if mean != lo:
            raise ValueError(f"every MR has {lo} attributes: cannot re-weight to a mean of {mean}")
        return {lo: 1.0}
    if not lo <= mean <= hi:
        raise ValueError(f"a mean of {mean} attributes per MR is outside the {lo} to {hi} of these MRs")
    if mean in (lo, hi):  # the limit of the tilt: every weight on the extreme count
        return {k: float(k == mean) for k in sorted(p)}

    def dist(t: float) -> dict[int, float]:
        top = max(k * t for k in p)
        w = {k: n * math.exp(k * t - top) for k, n in p.items()}
        z = sum(w.values())
        return {k: v / z for k, v in w.items()}

    a, b = -50.0, 50.0
    for _ in range(200):  # the mean rises with t: bisection
        t = (a + b) / 2
        if sum(k * q for k, q in dist(t).items()) < mean:
            a = t
        else:
            b = t
    return dist((a + b) / 2)


def reweighted(preds: Sequence[str], refs: Sequence[Sequence[str]], slots: Sequence[dict],
               mean: float = TEST_SET_MEAN) -> dict:
    """BLEU and SER of these outputs as if their MRs averaged ``mean`` attributes (module doc),
    with the weights used ({count: share of MRs}) and the effective number of MRs (Kish:
    (sum w)^2 / sum w^2), which says how much the re-weighting leans on few of them."""
    counts = [s["slots"] for s in slots]
    q = tilted(counts, mean)
    p = Counter(counts)
    weights = [q[k] * len(counts) / p[k] for k in counts]
    effective = sum(weights) ** 2 / sum(w * w for w in weights)
    return {"mean_attributes": mean, "BLEU": _bleu(_bleu_stats(preds, refs), weights), **_ser(slots, weights),
            "shares": {k: q[k] for k in sorted(q)}, "effective_mrs": effective}


def attribute_report(preds: Sequence[str], refs: Sequence[Sequence[str]], slots: Sequence[dict],
                     mean: float = TEST_SET_MEAN) -> dict:
    """``by_attributes`` and ``reweighted`` (None where ``mean`` is outside the counts present),
    as ``evaluate`` adds them to its metrics."""
    try:
        again = reweighted(preds, refs, slots, mean)
    except ValueError:
        again = None
    return {"by_attributes": by_attributes(preds, refs, slots), "reweighted": again}
