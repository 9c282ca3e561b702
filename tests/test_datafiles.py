"""The formats people have (datafiles.py, sources.py): every file format reads the same rows, every
source turns them into its examples, data.columns and data.val_path, and the tokenization cache
keyed by content. The slow tests train a step on the tiny model from each source and format."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from lora_dist.datafiles import DataFile
from lora_dist.sources import ALPACA_INPUT, ALPACA_TEMPLATE, DataError, Example, data_location, read_examples, \
    read_splits, render
from lora_dist.spec import DataSpec, SpecError, load_spec

from conftest import E2E_CSV, MAIN_JOB, TINY_OVERRIDES


def _e2e_rows() -> list[dict]:
    """60 rows spread over the devset (several restaurants, distinct MRs)."""
    with open(E2E_CSV, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))[::70][:60]


def _qa_rows() -> list[dict]:
    """Prompt/completion rows from the E2E devset (distinct MRs, so a split has both sides)."""
    return [{"prompt": r["mr"] + "\n", "completion": " " + r["ref"]} for r in _e2e_rows()]


def write(rows: list[dict], path: Path) -> str:
    """``rows`` written as ``path``'s format says (a directory without a suffix: save_to_disk)."""
    from datasets import Dataset

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        path.write_text(out.getvalue())
    elif path.suffix == ".parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    else:
        Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


FORMATS = ["d.jsonl", "d.json", "d.csv", "d.parquet", "saved", "uri.parquet"]


def _location(tmp_path: Path, name: str, rows: list[dict]) -> str:
    if name.startswith("uri."):
        return "file://" + write(rows, tmp_path / name)
    return write(rows, tmp_path / name)


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_the_same_examples(tmp_path, name):
    rows = _qa_rows()
    spec = DataSpec(source="jsonl", path=_location(tmp_path, name, rows))
    assert read_examples(data_location(spec), spec) == [Example(r["prompt"], r["completion"]) for r in rows]


def test_a_saved_dataset_dict_reads_its_split(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = _qa_rows()
    DatasetDict({"train": Dataset.from_list(rows[:40]), "test": Dataset.from_list(rows[40:])}).save_to_disk(
        str(tmp_path / "dd"))
    spec = DataSpec(source="jsonl", path=str(tmp_path / "dd"), hf_split="test")
    assert [e.completion for e in read_examples(data_location(spec), spec)] == [r["completion"] for r in rows[40:]]
    missing = DataSpec(source="jsonl", path=str(tmp_path / "dd"), hf_split="validation")
    with pytest.raises(DataError, match="has splits train, test, not 'validation': set data.hf_split"):
        read_examples(data_location(missing), missing)


def test_the_e2e_source_reads_any_format(tmp_path):
    rows = _e2e_rows()
    spec = DataSpec(source="e2e", path=write(rows, tmp_path / "e2e.parquet"))
    from lora_dist.sources import read_e2e

    assert read_examples(data_location(spec), spec) == read_e2e(write(rows, tmp_path / "e2e.csv"))


def test_alpaca_rows_take_the_alpaca_prompt(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hello.", "input": "", "output": "Hello."},
            {"instruction": "Say bye.", "output": "Bye."}]
    spec = DataSpec(source="alpaca", path=write(rows, tmp_path / "a.jsonl"))
    got = read_examples(data_location(spec), spec)
    assert got[0] == Example(render(ALPACA_TEMPLATE, "Add the numbers." + ALPACA_INPUT + "2 and 3"), "5")
    assert got[0].prompt.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert got[1:] == [Example(render(ALPACA_TEMPLATE, "Say hello."), "Hello."),
                       Example(render(ALPACA_TEMPLATE, "Say bye."), "Bye.")]


def test_text_rows_train_every_token_and_split_by_text(tmp_path):
    rows = [{"text": r["ref"]} for r in _e2e_rows()]
    spec = DataSpec(source="text", path=write(rows, tmp_path / "t.jsonl"))
    train, val = read_splits(spec, data_location(spec))
    assert all(e.prompt == "" for e in train + val) and train and val
    assert sorted(e.completion for e in train + val) == sorted(r["text"] for r in rows)
    assert not {e.completion for e in train} & {e.completion for e in val}


def test_columns_map_a_files_names_onto_the_sources(tmp_path):
    rows = [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(_qa_rows())]
    for name in ("q.jsonl", "q.csv", "q.parquet"):
        spec = DataSpec(source="jsonl", path=write(rows, tmp_path / name),
                        columns={"prompt": "question", "completion": "answer"})
        assert read_examples(data_location(spec), spec) == [Example(r["question"], r["answer"]) for r in rows]
    unmapped = DataSpec(source="jsonl", path=str(tmp_path / "q.parquet"))
    with pytest.raises(DataError, match=r"q.parquet: no columns 'prompt', 'completion' \(its columns: question, "
                                        r"answer, id\); data.columns maps"):
        read_examples(data_location(unmapped), unmapped)
    job = tmp_path / "job.yaml"
    job.write_text(f"name: a\ndata: {{source: jsonl, path: {tmp_path / 'q.jsonl'}, columns: {{question: prompt}}}}\n")
    with pytest.raises(SpecError, match=r"data.columns: \['question'\] are not columns of source 'jsonl' "
                                        r"\(prompt, completion\)"):
        load_spec(job)


def test_val_path_is_the_validation_side_whole(tmp_path):
    rows = _qa_rows()
    spec = DataSpec(source="jsonl", path=write(rows[:40], tmp_path / "train.jsonl"),
                    val_path=write(rows[40:], tmp_path / "val.parquet"))
    train, val = read_splits(spec, data_location(spec))
    assert [e.completion for e in train] == [r["completion"] for r in rows[:40]]
    assert [e.completion for e in val] == [r["completion"] for r in rows[40:]]


def test_paths_may_be_directories_and_uris_and_a_missing_one_is_named(tmp_path):
    write(_qa_rows(), tmp_path / "saved")
    job = tmp_path / "job.yaml"
    for path in (tmp_path / "saved", "s3://bucket/data.parquet", "hf://datasets/org/name"):
        job.write_text(f"name: a\ndata: {{source: jsonl, path: '{path}'}}\n")
        spec = load_spec(job)
        assert spec.with_absolute_paths().data.path == str(path)
    job.write_text("name: a\ndata: {source: jsonl, path: nope.jsonl, val_path: nope-val.jsonl}\n")
    with pytest.raises(SpecError) as e:
        load_spec(job)
    assert "data.path: file not found" in str(e.value) and "data.val_path: file not found" in str(e.value)


def test_digests_follow_content(tmp_path):
    rows = _qa_rows()
    saved = tmp_path / "saved"
    write(rows, saved)
    before = DataFile(str(saved)).digest()
    assert DataFile("file://" + str(saved)).digest() == before
    write(rows[:-1], tmp_path / "saved2")
    assert DataFile(str(tmp_path / "saved2")).digest() != before
    f = tmp_path / "d.jsonl"
    write(rows, f)
    assert DataFile(str(f)).digest() == DataFile("file://" + str(f)).digest()


def test_the_cache_hits_on_the_same_content_and_misses_on_changed_content(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from lora_dist.data import tokenize, tokenized

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = _qa_rows()
    saved, val = tmp_path / "saved", tmp_path / "val.jsonl"
    write(rows[:40], saved)
    write(rows[40:], val)
    spec = DataSpec(source="jsonl", path=str(saved), val_path=str(val), max_length=40)
    cold = tokenized(spec, tok, tmp_path / "cache")
    warm = tokenized(spec, tok, tmp_path / "cache")
    assert (cold.cache, warm.cache) == ("miss", "hit")
    examples = [Example(r["prompt"], r["completion"]) for r in rows]
    assert len(warm.train) == len(tokenize(examples[:40], tok, 40))
    assert len(warm.val) == len(tokenize(examples[40:], tok, 40))
    assert (warm.over_length, warm.longest) == (cold.over_length, cold.longest)
    lengths = [len(t.input_ids) for t in tokenize(examples, tok, 1000)]
    assert cold.longest == max(lengths) > 40 and cold.over_length == sum(n > 40 for n in lengths) > 0
    write(rows[40:-1], val)  # the validation file changed
    assert tokenized(spec, tok, tmp_path / "cache").cache == "miss"
    write(rows[:39], saved)  # the directory's content changed
    assert tokenized(spec, tok, tmp_path / "cache").cache == "miss"
    mapped = DataSpec(source="jsonl", path=str(saved), val_path=str(val), max_length=24,
                      columns={"prompt": "prompt"})
    assert tokenized(mapped, tok, tmp_path / "cache").cache == "miss"  # the columns are part of the key


def _train_one_step(tiny_llama_dir, tmp_path, *overrides: str):
    from lora_dist.store import read_manifest
    from lora_dist.train import train_local

    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"output.dir={tmp_path / 'runs'}", *TINY_OVERRIDES,
                                "train.max_steps=1", *overrides])
    log = io.StringIO()
    artifact = train_local(spec, job_id="one", stream=log)
    assert "step 1/1" in log.getvalue(), log.getvalue()
    return read_manifest(artifact), log.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMATS)
def test_each_format_trains_a_step(tiny_llama_dir, tmp_path, name):
    location = _location(tmp_path, name, _qa_rows())
    manifest, _ = _train_one_step(tiny_llama_dir, tmp_path, "data.source=jsonl", f"data.path={location}")
    assert manifest.data.source == "jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["e2e", "jsonl", "alpaca", "text"])
def test_each_source_trains_a_step(tiny_llama_dir, tmp_path, source):
    e2e = _e2e_rows()
    rows = {"e2e": e2e, "jsonl": _qa_rows(),
            "alpaca": [{"instruction": "Describe the restaurant.", "input": r["mr"], "output": r["ref"]} for r in e2e],
            "text": [{"text": r["ref"]} for r in e2e]}[source]
    path = write(rows, tmp_path / ("d.csv" if source == "e2e" else "d.jsonl"))
    # the Alpaca preamble is long in the tiny tokenizer's (E2E-trained) tokens
    manifest, _ = _train_one_step(tiny_llama_dir, tmp_path, f"data.source={source}", f"data.path={path}",
                                  f"data.max_length={256 if source == 'alpaca' else 96}")
    assert manifest.data.source == source
    from lora_dist.sources import template_for

    assert manifest.data.prompt_template == template_for(source)


@pytest.mark.slow
def test_val_path_and_columns_train_a_step(tiny_llama_dir, tmp_path):
    rows = [{"q": r["prompt"], "a": r["completion"]} for r in _qa_rows()]
    _, log = _train_one_step(tiny_llama_dir, tmp_path, "data.source=jsonl", "data.columns={prompt: q, completion: a}",
                             f"data.path={write(rows[:40], tmp_path / 't.parquet')}",
                             f"data.val_path={write(rows[40:], tmp_path / 'v.jsonl')}")
    assert "40 train examples" in log and f"{len(rows) - 40} validation" in log


def hub_cache(home: Path, repo: str, rows: list[dict], commit: str = "c0ffee" * 6 + "c0ff") -> None:
    """A hub dataset ``repo`` in ``home``'s datasets cache, as ``datasets`` lays out one it has
    downloaded and prepared (HF_HOME/datasets/ORG___NAME/default/0.0.0/COMMIT): prepared here by
    datasets' own parquet builder, then moved to where the hub builder would have put it."""
    import shutil

    from datasets import Dataset
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo.split("/")
    work = home / "prepare"
    work.mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(str(work / "train.parquet"))
    builder = Parquet(cache_dir=str(work / "cache"), dataset_name=name, hash=commit,
                      data_files={"train": str(work / "train.parquet")})
    builder.download_and_prepare()
    target = home / "datasets" / f"{org}___{name}" / "default" / "0.0.0" / commit
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default"}))
    shutil.rmtree(work)


@pytest.mark.slow
def test_a_hub_dataset_is_read_offline_from_the_datasets_cache(tiny_llama_dir, tmp_path):
    """hf://datasets/ORG/NAME through `lora-dist data` with HF_HUB_OFFLINE=1 and a cache that has it
    (the download itself cannot run here); a dataset the cache lacks is named with what to do."""
    import os

    from conftest import run_cli

    hub_cache(tmp_path / "home", "acme/qa", _qa_rows())
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "LORA_DIST_CACHE": str(tmp_path / "cache")}
    args = ["data", str(MAIN_JOB), f"--set=model.base={tiny_llama_dir}", "--set=data.source=jsonl"]
    proc = run_cli(*args, "--set=data.path=hf://datasets/acme/qa", cwd=tmp_path, env=env)
    assert "data: hf://datasets/acme/qa (source jsonl)" in proc.stdout and "examples: " in proc.stdout
    again = run_cli(*args, "--set=data.path=hf://datasets/acme/qa", cwd=tmp_path, env=env)
    assert "tokenization cache hit" in again.stdout
    missing = run_cli(*args, "--set=data.path=hf://datasets/acme/nope", cwd=tmp_path, env=env, check=False)
    assert missing.returncode == 2 and "data.path: hf://datasets/acme/nope (revision main, split 'train') cannot " \
                                       "be loaded" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr


def test_a_prompt_may_be_empty_the_completion_may_not(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "", "completion": " x"}) + "\n")
    spec = DataSpec(source="jsonl", path=str(f))
    assert read_examples(data_location(spec), spec) == [Example("", " x")]
    f.write_text(json.dumps({"prompt": "x", "completion": ""}) + "\n")
    with pytest.raises(DataError, match="d.jsonl line 1: expected an object .*; 'completion' is empty"):
        read_examples(data_location(spec), spec)
