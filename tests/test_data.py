import json

import pytest

from lora_dist.data import IGNORE_INDEX, BatchPlan, collate, tokenize
from lora_dist.sources import (E2E_TEMPLATE, DataError, Example, e2e_name, fetch_e2e, read_e2e, read_jsonl, render,
                                split_by_name, split_by_prompt, split_examples, spread)
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


def test_name_split_holds_out_whole_restaurants_and_is_stable(e2e_csv):
    """data.split: name (the default for E2E): no restaurant on both sides, so validation (and the
    quality benchmark's held-out MRs) are about restaurants the adapter never saw."""
    ex = read_e2e(e2e_csv)
    assert ex[0].name == "Alimentum" and e2e_name("eatType[pub], name[The Mill], near[X]") == "The Mill"
    train, val = split_by_name(ex, 0.1)
    assert len(train) + len(val) == len(ex)
    held = {e.name for e in val}
    assert held and not held & {e.name for e in train}
    assert {e.prompt for e in val} == {e.prompt for e in ex if e.name in held}  # every MR of a held-out name
    n_val = len({e.prompt for e in val})
    assert 0.1 * 547 <= n_val < 0.25 * 547  # names are added until a tenth of the MRs is held out
    train2, val2 = split_by_name(list(reversed(ex)), 0.1)
    assert {e.prompt for e in val2} == {e.prompt for e in val}
    # by meaning representation, held-out MRs share restaurants with the training side
    _, by_mr = split_by_prompt(ex, 0.1)
    assert {e.name for e in by_mr} & {e.name for e in train2}


def test_split_follows_the_spec_and_needs_two_restaurants(e2e_csv):
    from lora_dist.spec import DataSpec

    ex = read_e2e(e2e_csv)
    by_name = split_examples(ex, DataSpec(path=str(e2e_csv)))
    assert by_name == split_by_name(ex, 0.1)
    assert split_examples(ex, DataSpec(path=str(e2e_csv), split="mr")) == split_by_prompt(ex, 0.1)
    one = [e for e in ex if e.name == "Aromi"]
    with pytest.raises(DataError, match="data.split: name holds out whole restaurants, and the data has 1"):
        split_by_name(one, 0.1)
    jsonl = [Example("a", " b"), Example("c", " d"), Example("e", " f")]
    assert split_examples(jsonl, DataSpec(source="jsonl", path=str(e2e_csv))) == split_by_prompt(jsonl, 0.1)


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


def _pad_fraction(plan: BatchPlan, lengths: list[int], batches: int) -> float:
    pad = total = 0
    for b in range(batches):
        lens = [lengths[i] for i in plan.indices(b)]
        pad += max(lens) * len(lens) - sum(lens)
        total += max(lens) * len(lens)
    return pad / total


def test_grouped_batches_cover_each_epoch_like_padded_ones_and_pad_less(tiny_llama_dir):
    """Grouped batching reorders the examples of each window of GROUP_WINDOW micro-batches by
    length: the same examples as padded batching over every whole window, as a pure function
    of the batch index, with far less padding on E2E."""
    from transformers import AutoTokenizer

    from lora_dist.data import GROUP_WINDOW

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lengths = [len(t.input_ids) for t in tokenize(read_e2e(E2E_CSV), tok, max_length=128)]
    n, size = len(lengths), 8
    grouped = BatchPlan(n, size, seed=5, lengths=lengths, mode="grouped")
    padded = BatchPlan(n, size, seed=5)
    windows = -(-2 * n // (size * GROUP_WINDOW))  # whole windows spanning two epochs
    batches = windows * GROUP_WINDOW
    seen = sorted(i for b in range(batches) for i in grouped.indices(b))
    assert seen == sorted(i for b in range(batches) for i in padded.indices(b))
    assert all(len(grouped.indices(b)) == size for b in range(batches))
    again = BatchPlan(n, size, seed=5, lengths=lengths, mode="grouped")
    assert [again.indices(b) for b in (130, 3, 64, 0)] == [grouped.indices(b) for b in (130, 3, 64, 0)]
    assert grouped.indices(0) != BatchPlan(n, size, seed=6, lengths=lengths, mode="grouped").indices(0)
    pad_grouped, pad_padded = _pad_fraction(grouped, lengths, batches), _pad_fraction(padded, lengths, batches)
    print(f"E2E, micro-batches of {size}: padding {100 * pad_padded:.1f}% padded, {100 * pad_grouped:.1f}% grouped")
    assert pad_grouped < pad_padded / 4, (pad_grouped, pad_padded)
    # a window's batches are not in length order (lengths would rise through every window)
    firsts = [lengths[grouped.indices(b)[0]] for b in range(GROUP_WINDOW)]
    assert firsts != sorted(firsts)


def test_packed_batches_fill_rows_and_cover_each_epoch_once(tiny_llama_dir):
    """Packed: every micro-batch is at most micro_batch_size rows of at most max_length tokens;
    over the windows that span two epochs each example is packed exactly twice; micro-batch i is
    a pure function of i (asked in any order, from a fresh plan); rows are nearly full."""
    from transformers import AutoTokenizer

    from lora_dist.data import GROUP_WINDOW, collate_packed

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    items = tokenize(read_e2e(E2E_CSV), tok, max_length=128)
    lengths = [len(t.input_ids) for t in items]
    n, size, capacity = len(lengths), 4, 128
    plan = BatchPlan(n, size, seed=5, lengths=lengths, mode="packed", capacity=capacity)
    windows = -(-2 * n // (size * GROUP_WINDOW))
    batches, seen = 0, []
    while plan._locate(batches)[0] < windows:
        rows = plan.rows(batches)
        assert 1 <= len(rows) <= size and all(sum(lengths[j] for j in row) <= capacity for row in rows)
        seen += plan.indices(batches)
        batches += 1
    padded = BatchPlan(n, size, seed=5)
    assert sorted(seen) == sorted(i for b in range(windows * GROUP_WINDOW) for i in padded.indices(b))
    fresh = BatchPlan(n, size, seed=5, lengths=lengths, mode="packed", capacity=capacity)
    order = [batches - 1, 7, 0, batches // 2]
    assert [fresh.rows(b) for b in order] == [plan.rows(b) for b in order]
    # padding: a micro-batch is as wide as its fullest row
    tokens = sum(lengths[j] for b in range(batches) for j in plan.indices(b))
    positions = sum(len(plan.rows(b)) * max(sum(lengths[j] for j in row) for row in plan.rows(b))
                    for b in range(batches))
    pad_padded = _pad_fraction(padded, lengths, windows * GROUP_WINDOW)
    print(f"E2E in rows of {capacity}, {size} to a micro-batch: padding {100 * (1 - tokens / positions):.1f}% packed, "
          f"{100 * pad_padded:.1f}% padded")
    assert 1 - tokens / positions < pad_padded
    # the model inputs: positions restart with every example, no attention_mask, first labels ignored
    rows = [[items[j] for j in row] for row in plan.rows(0)]
    batch = collate_packed(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    first = rows[0]
    starts = [sum(len(t.input_ids) for t in first[:k]) for k in range(len(first))]
    assert [int(batch["position_ids"][0, s]) for s in starts] == [0] * len(first)
    assert all(int(batch["labels"][0, s]) == IGNORE_INDEX for s in starts)


def test_a_batch_plan_needs_the_lengths_to_group_and_a_known_mode():
    with pytest.raises(DataError, match="grouped needs the length"):
        BatchPlan(10, 4, seed=0, mode="grouped")
    with pytest.raises(DataError, match="data.batching: 'sorted'"):
        BatchPlan(10, 4, seed=0, lengths=[1] * 10, mode="sorted")
    with pytest.raises(DataError, match="packed needs a row capacity"):
        BatchPlan(10, 4, seed=0, lengths=[9] * 10, mode="packed", capacity=8)


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


def _same(arrays, items) -> bool:
    return len(arrays) == len(items) and all(a == b for a, b in zip(arrays, items))


def test_tokenized_splits_are_cached_memory_mapped_and_keyed_by_what_makes_them(tiny_llama_dir, tmp_path):
    """The first run tokenizes and caches; the next memory-maps the same splits. A different data
    file, max_length or tokenizer is a different entry; a damaged entry is tokenized afresh."""
    import numpy as np
    from transformers import AutoTokenizer

    from lora_dist.data import tokenized
    from lora_dist.spec import DataSpec

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = DataSpec(path=str(E2E_CSV), max_length=64)
    cold = tokenized(spec, tok, tmp_path)
    warm = tokenized(spec, tok, tmp_path)
    assert (cold.cache, warm.cache) == ("miss", "hit")
    assert isinstance(warm.train.ids, np.memmap) and isinstance(warm.train.offsets, np.memmap)
    train, val = split_examples(read_e2e(E2E_CSV), spec)
    assert _same(warm.train, tokenize(train, tok, 64))
    assert _same(warm.val, tokenize(spread(val, spec.max_val_examples), tok, 64))
    # capped, the validation side still holds every held-out restaurant (not a prefix of the file)
    assert len(val) > spec.max_val_examples
    assert {e.name for e in spread(val, spec.max_val_examples)} == {e.name for e in val}
    assert (warm.n_train_prompts, warm.n_val_prompts) == (cold.n_train_prompts, cold.n_val_prompts)
    assert warm.train.lengths() == [len(t.input_ids) for t in tokenize(train, tok, 64)]
    entries = lambda: sorted(p.name for p in (tmp_path / "tokenized").iterdir() if p.is_dir())  # noqa: E731
    [entry] = entries()

    assert tokenized(DataSpec(path=str(E2E_CSV), max_length=48), tok, tmp_path).cache == "miss"
    by_mr = tokenized(DataSpec(path=str(E2E_CSV), max_length=64, split="mr"), tok, tmp_path)
    assert by_mr.cache == "miss" and by_mr.n_val_prompts != warm.n_val_prompts
    fewer = tmp_path / "fewer.csv"
    fewer.write_text("".join(E2E_CSV.read_text().splitlines(keepends=True)[:-1]))
    assert tokenized(DataSpec(path=str(fewer), max_length=64), tok, tmp_path).cache == "miss"
    assert len(entries()) == 4

    offsets = tmp_path / "tokenized" / entry / "train.offsets.npy"
    offsets.write_bytes(offsets.read_bytes()[:-16])  # torn
    again = tokenized(spec, tok, tmp_path)
    assert again.cache == "miss" and _same(again.train, tokenize(train, tok, 64))
    assert tokenized(spec, tok, tmp_path).cache == "hit"

    said = []
    blocked = tmp_path / "not-a-dir"  # a cache that cannot be written: the run goes on uncached
    blocked.write_text("")
    uncached = tokenized(spec, tok, blocked, say=said.append)
    assert uncached.cache is None and _same(uncached.train, tokenize(train, tok, 64))
    assert "not writable" in said[0] and str(blocked) in said[0]


def test_the_processes_of_a_machine_tokenize_once(tiny_llama_dir, tmp_path):
    """Two processes (a job's workers) asking at once: one tokenizes, the other waits for it and
    reads the cache."""
    import subprocess
    import sys

    code = ("import sys\nfrom pathlib import Path\nfrom transformers import AutoTokenizer\n"
            "from lora_dist.data import tokenized\nfrom lora_dist.spec import DataSpec\n"
            f"tok = AutoTokenizer.from_pretrained({str(tiny_llama_dir)!r})\n"
            f"print(tokenized(DataSpec(path={str(E2E_CSV)!r}, max_length=64), tok, Path({str(tmp_path)!r})).cache)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert sorted(o.strip().splitlines()[-1] for o, _ in outs) == ["hit", "miss"], outs
    assert len([p for p in (tmp_path / "tokenized").iterdir() if p.is_dir()]) == 1


def test_the_quality_splits_partition_the_devset_by_restaurant_as_their_script_writes_them():
    """jobs/data/e2e/devset-{train,select,report}.csv (bench/e2e_split.py): every row of devset.csv in
    exactly one, no restaurant on two sides, select is what the main job's name split holds out (the
    MRs earlier choices were made on), report the next restaurants in the same order."""
    import csv
    import subprocess
    import sys

    from conftest import REPO
    from lora_dist.spec import load_spec

    check = subprocess.run([sys.executable, str(REPO / "bench" / "e2e_split.py"), "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    parts = {}
    for side in ("train", "select", "report"):
        with open(E2E_CSV.parent / f"devset-{side}.csv", newline="") as f:
            parts[side] = [(r["mr"], r["ref"]) for r in csv.DictReader(f)]
    with open(E2E_CSV, newline="") as f:
        every = [(r["mr"], r["ref"]) for r in csv.DictReader(f)]
    assert sorted(sum(parts.values(), [])) == sorted(every)
    names = {side: {e2e_name(mr) for mr, _ in rows} for side, rows in parts.items()}
    assert not (names["train"] & names["select"] or names["train"] & names["report"]
                or names["select"] & names["report"])
    spec = load_spec(REPO / "jobs" / "smollm2-e2e.yaml", [f"data.path={E2E_CSV}"])
    _, val = split_examples(read_e2e(E2E_CSV), spec.data)
    assert {e.mr for e in val} == {mr for mr, _ in parts["select"]}
    assert len({mr for mr, _ in parts["report"]}) >= 100  # enough MRs to score
