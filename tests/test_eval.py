"""E2E evaluation: the metrics behave as scores should, and `lora-dist eval` runs end to end."""

import json

import pytest

from lora_dist.evaluate import e2e_references
from lora_dist.metrics import e2e_metrics

from conftest import run_cli

REFS = [["The Eagle is a coffee shop by the river.", "Near the river is The Eagle, a coffee shop."],
        ["Alimentum is not family-friendly."],
        ["Zizzi is a cheap pub in the city centre.", "In the city centre, Zizzi is a cheap pub.",
         "Zizzi, a pub in the centre, is cheap."]]


@pytest.fixture(params=[pytest.param(False, id="no-java"), pytest.param(True, id="meteor", marks=pytest.mark.slow)])
def meteor(request, monkeypatch):
    """METEOR runs Java (9 s a call): the fast tier scores the other four, as on a machine without Java."""
    import shutil

    if request.param and not shutil.which("java"):
        pytest.fail("METEOR needs java on PATH")
    if not request.param:
        monkeypatch.setattr("lora_dist.metrics.shutil.which", lambda name: None)
    return request.param


def test_perfect_outputs_score_top_and_worse_outputs_score_lower(meteor):
    perfect = e2e_metrics([r[0] for r in REFS], REFS)
    assert (perfect["METEOR"] is not None) == meteor
    assert perfect["BLEU"] == pytest.approx(100.0) and perfect["ROUGE_L"] == pytest.approx(100.0)
    off = e2e_metrics(["a coffee shop", "Alimentum is nice.", "Zizzi."], REFS)
    for k in ("BLEU", "NIST", "ROUGE_L", "CIDEr"):
        assert off[k] < perfect[k], k
    if meteor:
        assert off["METEOR"] < perfect["METEOR"]
    swapped = e2e_metrics([REFS[1][0], REFS[0][0], REFS[2][0]], REFS)  # right sentences, wrong MRs
    assert swapped["BLEU"] < 60 and swapped["CIDEr"] < perfect["CIDEr"] / 2


def test_distinct_mrs_in_order_of_first_appearance(e2e_csv):
    prompts, refs = e2e_references(e2e_csv)
    assert len(prompts) == 547 and sum(len(r) for r in refs) == 4672
    assert "name[Alimentum], area[city centre], familyFriendly[no]" in prompts[0]
    assert e2e_references(e2e_csv, limit=5)[0] == prompts[:5]


@pytest.mark.slow
def test_eval_cli_writes_predictions_and_prints_metrics_last(trained, e2e_csv, tmp_path):
    artifact, _ = trained
    preds, slots = tmp_path / "preds.txt", tmp_path / "slots.jsonl"
    proc = run_cli("eval", str(artifact), "--data", str(e2e_csv), "--out", str(preds), "--limit", "3",
                   "--num-beams", "2", "--max-new-tokens", "40", "--slots", str(slots), cwd=tmp_path)
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "SER"} <= set(metrics) and metrics["mrs"] == 3
    assert metrics["rerank"] == "ser"  # the default with a beam
    lines = preds.read_text().splitlines()
    assert len(lines) == 3 and all(lines)
    assert metrics["BLEU"] > 5  # a trained adapter says something about the restaurant
    # each output's slot errors, in MR order, adding up to the totals
    per = [json.loads(x) for x in slots.read_text().splitlines()]
    assert [p["prediction"] for p in per] == lines
    assert per[0]["mr"] == "name[Alimentum], area[city centre], familyFriendly[no]"
    for key in ("slots", "missing", "wrong", "added"):
        assert metrics[key] == sum(p[key] if key == "slots" else len(p[key]) for p in per), key
    errors = metrics["missing"] + metrics["wrong"] + metrics["added"]
    from lora_dist.evaluate import e2e_items
    from lora_dist.slots import parse_mr

    assert metrics["slots"] == sum(len(parse_mr(mr)) for mr in e2e_items(e2e_csv, limit=3)[0])
    assert metrics["SER"] == pytest.approx(100 * errors / metrics["slots"])
    # by attributes per MR: the same outputs, each count on its own; and re-weighted to 7 where the
    # counts present allow it (3 MRs of 3 attributes cannot be made to average 7)
    rows = metrics["by_attributes"]
    assert sum(r["mrs"] for r in rows) == 3 and sum(r["attributes"] * r["mrs"] for r in rows) == metrics["slots"]
    assert sum(r["missing"] for r in rows) == metrics["missing"]
    counts = {r["attributes"] for r in rows}
    assert (metrics["reweighted"] is None) == (not min(counts) <= 7 <= max(counts))
    assert f"{rows[0]['attributes']} attributes: {rows[0]['mrs']} MRs, BLEU" in proc.stderr
    again = run_cli("eval", str(artifact), "--data", str(e2e_csv), "--slots", str(slots), cwd=tmp_path, check=False)
    assert again.returncode == 2 and "--slots" in again.stderr and "exists" in again.stderr


def test_slot_rerank_never_outputs_more_slot_errors_than_the_best_beam(tiny_trained, e2e_csv):
    """--rerank ser chooses among the beam's candidates: per MR never more slot errors than the
    top beam, which plain decoding outputs (the same search)."""
    from lora_dist.adapter import load_adapted
    from lora_dist.evaluate import evaluate_e2e, evaluate_e2e_reranks

    artifact, _ = tiny_trained
    loaded, _ = load_adapted(artifact)
    kw = dict(limit=6, num_beams=4, max_new_tokens=16, batch_size=3)
    plain, _, plain_slots = evaluate_e2e(loaded.model, loaded.tokenizer, e2e_csv, **kw)
    ranked, metrics, ranked_slots = evaluate_e2e(loaded.model, loaded.tokenizer, e2e_csv, rerank="ser", **kw)
    assert len(ranked) == len(plain) == 6
    for a, b in zip(plain_slots, ranked_slots):
        errors = [len(x["missing"]) + len(x["wrong"]) + len(x["added"]) for x in (a, b)]
        assert errors[1] <= errors[0], (a, b)
        assert b["prediction"] == a["prediction"] or errors[1] < errors[0]  # a change only for fewer errors
    # both from one beam search (bench/e2e_quality.py --rerank): the same outputs and figures
    both = evaluate_e2e_reranks(loaded.model, loaded.tokenizer, e2e_csv, **kw)
    assert both["none"][0] == plain and both["ser"][0] == ranked and both["ser"][1] == metrics
    with pytest.raises(ValueError, match="rerank: must be one of none, ser"):
        evaluate_e2e(loaded.model, loaded.tokenizer, e2e_csv, rerank="bleu", **kw)


def test_batched_decoding_gives_the_same_outputs_as_one_at_a_time(tiny_trained, e2e_csv):
    """Left padding with a mask: an MR's output does not depend on what it was batched with."""
    from lora_dist.adapter import load_adapted
    from lora_dist.generate import generate

    artifact, _ = tiny_trained
    loaded, manifest = load_adapted(artifact)
    prompts, _ = e2e_references(e2e_csv, limit=4)  # different lengths: the shorter ones get padded
    one = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=24, batch_size=1)
    batched = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=24, batch_size=4)
    assert len({len(loaded.tokenizer(p)["input_ids"]) for p in prompts}) > 1
    assert batched == one and all(one)


def test_evaluation_prompts_with_the_template_the_adapter_was_trained_with(tiny_trained, e2e_csv):
    from lora_dist.generate import format_prompt, prompt_template
    from lora_dist.store import read_manifest

    artifact, _ = tiny_trained
    manifest = read_manifest(artifact)
    manifest = manifest.updated(data=manifest.data.updated(prompt_template="MR: {input} =>"))  # as if trained
    assert prompt_template(manifest) == "MR: {input} =>"
    assert format_prompt(manifest, " name[X] ") == "MR: name[X] =>"
    assert e2e_references(e2e_csv, limit=1, template="MR: {input} =>")[0][0].startswith("MR: name[Alimentum]")
    manifest = manifest.updated(data=manifest.data.updated(prompt_template=None))  # from before the record
    assert format_prompt(manifest, "name[X]").startswith("Describe the restaurant")


def test_an_mr_that_cannot_be_scored_is_refused_before_any_generation(tmp_path, tiny_trained):
    from lora_dist.sources import DataError
    from lora_dist.evaluate import evaluate_e2e

    bad = tmp_path / "bad.csv"
    bad.write_text("mr,ref\nname[Aromi],Aromi is a pub.\njust some text,A reference.\n")
    with pytest.raises(DataError, match="distinct MR 2: not an E2E meaning representation"):
        evaluate_e2e(None, None, bad)  # no model needed: refused before generating
    artifact, _ = tiny_trained
    same = run_cli("eval", str(artifact), "--data", str(bad), "--out", str(tmp_path / "p"), "--slots",
                   str(tmp_path / "p"), cwd=tmp_path, check=False)
    assert same.returncode == 2 and "--slots: the same file as --out" in same.stderr
