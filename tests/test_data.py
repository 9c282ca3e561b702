import json

import pytest

from lora_dist.data import (E2E_TEMPLATE, IGNORE_INDEX, BatchPlan, DataError, Example, collate, fetch_e2e,
                            read_e2e, read_jsonl, render, split_by_prompt, tokenize)
from lora_dist.store import sha256_file

from conftest import E2E_CSV


def test_the_repository_carries_the_reference_e2e_devset():
    # the same bytes as the reference copy (jobs/data/e2e/README.md): a fresh clone needs nothing beside it
    assert sha256_file(E2E_CSV) == "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9"


def test_prompt_template_puts_the_input_in_place_and_nothing_else():
    assert render(E2E_TEMPLATE, "name[X]") == "Describe the restaurant in one sentence.\nAttributes: name[X]\nDescription:"
    assert render("{input} {other}", "a {b}") == "a {b} {other}"  # no other braces are interpreted


def test_e2e_devset_reads_all_references(e2e_csv):
    ex = read_e2e(e2e_csv)
    assert len(ex) == 4672
    assert len({e.prompt for e in ex}) == 547
    assert "name[Alimentum]" in ex[0].prompt and ex[0].completion.startswith(" ")


def test_split_is_by_meaning_representation_and_stable(e2e_csv):
    ex = read_e2e(e2e_csv)
    train, val = split_by_prompt(ex, 0.1)
    assert len(train) + len(val) == len(ex)
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    n_val = len({e.prompt for e in val})
    assert 20 < n_val < 90  # about 10% of 547 MRs
    train2, val2 = split_by_prompt(list(reversed(ex)), 0.1)
    assert {e.prompt for e in val2} == {e.prompt for e in val}


def test_labels_cover_completion_tokens_only(tiny_llama_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    e = Example("Attributes: name[X]\nDescription:", " X is a pub.")
    [t] = tokenize([e], tok, max_length=64)
    n_prompt = len(tok(e.prompt, add_special_tokens=False)["input_ids"])
    assert t.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert t.labels[n_prompt:] == t.input_ids[n_prompt:]
    assert t.input_ids[-1] == tok.eos_token_id
    assert tok.decode(t.input_ids[n_prompt:-1]) == " X is a pub."
    batch = collate([t, tokenize([Example("a", " b")], tok, 64)[0]], pad_id=tok.eos_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORE_INDEX).all()


def test_batch_plan_is_a_pure_function_covering_each_epoch_once():
    plan = BatchPlan(10, 4, seed=3)
    seen = [i for b in range(5) for i in plan.indices(b)]  # 20 positions = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    again = BatchPlan(10, 4, seed=3)
    assert [again.indices(b) for b in (4, 0, 2)] == [plan.indices(b) for b in (4, 0, 2)]
    assert BatchPlan(10, 4, seed=4).indices(0) != plan.indices(0)


def test_jsonl_reads_and_names_bad_lines(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"prompt": "Q: 1+1?\nA:", "completion": " 2"}) + "\n\n")
    assert read_jsonl(good) == [Example("Q: 1+1?\nA:", " 2")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": " y"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="line 2: expected an object"):
        read_jsonl(bad)


def test_csv_without_expected_columns_is_named(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="columns 'mr' and 'ref'"):
        read_e2e(f)


def test_offline_download_says_how_to_point_at_a_local_copy(tmp_path):
    with pytest.raises(DataError, match="data.path"):
        fetch_e2e(tmp_path, url="http://127.0.0.1:9/e2e-dataset.zip", timeout=5)
    assert not (tmp_path / "e2e" / "trainset.csv").exists()
