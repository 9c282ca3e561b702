"""E2E NLG metrics from maintained implementations (the paper's Table 3 columns).

BLEU: sacrebleu's multi-reference corpus BLEU. NIST: nltk's corpus NIST (n=5). METEOR:
pycocoevalcap's METEOR 1.5 (runs Java; reported as None where no ``java`` is installed). ROUGE-L:
rouge-score (the best F-measure over each MR's references, averaged). CIDEr: pycocoevalcap's CIDEr.
As the E2E challenge's scripts do, text is lower-cased; every hypothesis is scored against all
references of its meaning representation. Scores are on the 0-100 scale except NIST and CIDEr.
"""

from __future__ import annotations

import re
import shutil
from typing import Sequence

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def e2e_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """Corpus scores of ``hyps`` (one per MR) against ``refs`` (all references of that MR)."""
    import sacrebleu
    from nltk.translate.nist_score import corpus_nist
    from pycocoevalcap.cider.cider import Cider
    from rouge_score import rouge_scorer

    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"need one hypothesis per reference set, got {len(hyps)} and {len(refs)}")
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(list(hyps), streams, lowercase=True).score

    tok_hyps = [tokenize(h) for h in hyps]
    tok_refs = [[tokenize(r) for r in rs] for rs in refs]
    # nltk divides by the count of each n-gram order in the hypotheses: with no hypothesis of 5
    # tokens there is no 5-gram term (the official script likewise scores only orders present).
    longest = max(len(h) for h in tok_hyps)
    nist = corpus_nist(tok_refs, tok_hyps, n=min(5, longest)) if longest else 0.0

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge_l = 100 * sum(scorer.score_multi(list(rs), h)["rougeL"].fmeasure for h, rs in zip(hyps, refs)) / len(hyps)

    gts = {i: [" ".join(t) for t in rs] for i, rs in enumerate(tok_refs)}
    res = {i: [" ".join(h) or "."] for i, h in enumerate(tok_hyps)}
    cider, _ = Cider().compute_score(gts, res)

    meteor = None
    if shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()
        try:
            meteor = 100 * m.compute_score(gts, res)[0]
        finally:
            m.close() if hasattr(m, "close") else None
    return {"BLEU": float(bleu), "NIST": float(nist), "METEOR": meteor, "ROUGE_L": float(rouge_l), "CIDEr": float(cider)}
