"""E2E scores by attributes per MR and re-weighted to another mean (``lora_dist.byattrs``)."""

import random

import pytest

from lora_dist.byattrs import by_attributes, reweighted, tilted

NAMES = ["The Eagle", "Zizzi", "Loch Fyne", "Aromi", "Cotto", "The Vaults"]
VALUES = {"eatType": ["pub", "coffee shop", "restaurant"], "food": ["French", "Japanese", "Italian"],
          "area": ["riverside", "city centre"], "priceRange": ["cheap", "high"],
          "customer rating": ["low", "high"], "near": ["Burger King", "Café Rouge"], "familyFriendly": ["yes", "no"]}


def outputs(n: int, seed: int = 0):
    """MRs of 3 to 8 attributes, references stating all of them, outputs that leave the last one out
    of an MR of 6 or more: (preds, refs, per-output slot errors as `lora-dist eval --slots` writes them)."""
    rng = random.Random(seed)
    preds, refs, slots = [], [], []
    for _ in range(n):
        keys = rng.sample(sorted(VALUES), rng.randint(2, 7))
        mr = {"name": rng.choice(NAMES), **{k: rng.choice(VALUES[k]) for k in keys}}
        text = ", ".join(f"{k} [{v}]" for k, v in mr.items())
        phrases = [f"{mr['name']} is a place"] + [f"its {k} is {v}" for k, v in mr.items() if k != "name"]
        ref = " and ".join(phrases) + "."
        kept = phrases[:-1] if len(phrases) >= 6 else phrases
        pred = " and ".join(kept) + "."
        preds.append(pred)
        refs.append([ref, " ".join(reversed(ref.split()))])
        slots.append({"mr": text, "prediction": pred, "slots": len(mr), "missing": list(mr)[len(kept):],
                      "wrong": [], "added": []})
    return preds, refs, slots


def bleu(preds, refs) -> float:
    """The corpus BLEU `lora-dist eval` reports (metrics.e2e_metrics: sacrebleu, lowercased)."""
    import sacrebleu

    return sacrebleu.corpus_bleu(preds, [list(r) for r in zip(*refs)], lowercase=True).score


def test_each_attribute_count_is_scored_on_its_own_mrs():
    preds, refs, slots = outputs(60)
    rows = by_attributes(preds, refs, slots)
    assert [r["attributes"] for r in rows] == sorted({s["slots"] for s in slots})
    assert sum(r["mrs"] for r in rows) == 60
    for r in rows:
        mine = [i for i, s in enumerate(slots) if s["slots"] == r["attributes"]]
        assert r["BLEU"] == pytest.approx(bleu([preds[i] for i in mine], [refs[i] for i in mine]))
        left_out = r["mrs"] if r["attributes"] >= 6 else 0  # one attribute of each such MR
        assert (r["missing"], r["wrong"], r["added"]) == (left_out, 0, 0), r
        assert r["SER"] == pytest.approx(100 * left_out / (r["attributes"] * r["mrs"]))


def test_reweighting_to_the_sets_own_mean_changes_nothing():
    preds, refs, slots = outputs(60)
    own = sum(s["slots"] for s in slots) / len(slots)
    again = reweighted(preds, refs, slots, own)
    assert again["BLEU"] == pytest.approx(bleu(preds, refs), rel=1e-6)
    assert again["SER"] == pytest.approx(100 * sum(len(s[k]) for s in slots for k in ("missing", "wrong", "added"))
                                         / sum(s["slots"] for s in slots), rel=1e-6)
    assert again["effective_mrs"] == pytest.approx(60, rel=1e-6)


def test_reweighting_to_longer_mrs_weighs_them_more_and_hits_the_mean():
    preds, refs, slots = outputs(80, seed=1)
    shares = tilted([s["slots"] for s in slots], 7.0)
    assert sum(k * q for k, q in shares.items()) == pytest.approx(7.0)
    assert sum(shares.values()) == pytest.approx(1.0)
    plain = reweighted(preds, refs, slots, sum(s["slots"] for s in slots) / len(slots))
    longer = reweighted(preds, refs, slots, 7.0)
    assert longer["shares"] == pytest.approx(shares)
    assert longer["SER"] > plain["SER"]  # these outputs drop more of a longer MR
    assert longer["effective_mrs"] < 80


def test_a_mean_at_the_largest_count_weighs_only_those_mrs():
    """The report split's MRs have 3 to 7 attributes: re-weighted to 7 is its 7-attribute MRs."""
    preds, refs, slots = outputs(80, seed=2)
    top = max(s["slots"] for s in slots)
    assert tilted([s["slots"] for s in slots], top) == {k: float(k == top) for k in sorted({s["slots"] for s in slots})}
    again = reweighted(preds, refs, slots, top)
    row = [r for r in by_attributes(preds, refs, slots) if r["attributes"] == top][0]
    assert again["BLEU"] == pytest.approx(row["BLEU"]) and again["SER"] == pytest.approx(row["SER"])
    assert again["effective_mrs"] == pytest.approx(row["mrs"])


@pytest.mark.parametrize("counts, mean, says", [
    ([3, 4, 5], 5.5, "outside the 3 to 5"),
    ([3, 4, 5], 2.0, "outside the 3 to 5"),
    ([6, 6], 7.0, "every MR has 6 attributes"),
])
def test_a_mean_the_counts_cannot_reach_is_refused(counts, mean, says):
    with pytest.raises(ValueError, match=says):
        tilted(counts, mean)
