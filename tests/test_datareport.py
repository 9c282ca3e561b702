"""`lora-dist data` (datareport.py): the job's data read and tokenized as the job reads it, its
figures, the trained spans marked; and every bad data file refused with exit 2, naming the file, the
row and the problem, by `data`, `train` and `submit` before anything starts."""

from __future__ import annotations

import json
import sys

import pytest

from lora_dist.cli import main
from lora_dist.datareport import TRAINED, count, render_trained

from conftest import E2E_CSV, MAIN_JOB, REPO

sys.path.insert(0, str(REPO / "bench"))
from bad_inputs import CASES, DATA_FILES  # noqa: E402

DATA_CASES = [c for c in CASES if c[3].startswith(("data.path:", "data.val_path:", "data.columns:"))]


@pytest.fixture
def tiny_job(tiny_llama_dir, tmp_path, monkeypatch):
    """A job on the tiny model, its cache in tmp_path, run from tmp_path with the bad data files."""
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for name, text in DATA_FILES.items():
        (tmp_path / name).write_text(text)
    return [f"--set=model.base={tiny_llama_dir}", f"--set=output.dir={tmp_path / 'runs'}"]


def test_the_report_counts_what_the_job_tokenizes(tiny_job, tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from lora_dist.data import tokenized
    from lora_dist.spec import load_spec
    from lora_dist.store import cache_root

    args = ["data", str(MAIN_JOB), *tiny_job, f"--set=data.path={E2E_CSV}", "--set=data.max_length=48", "--show=3"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "tokenization cache miss" in first.out and "cached in" in first.err
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tokenization cache hit" in out  # the cache the job reads
    spec = load_spec(MAIN_JOB, [a.removeprefix("--set=") for a in args if a.startswith("--set=")])
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokens = tokenized(spec.data, tok, cache_root())
    assert tokens.cache == "hit"
    train, val = count(tokens.train, tokens.n_train_prompts), count(tokens.val, tokens.n_val_prompts)
    assert f"examples: {train.examples:,} train ({train.prompts:,} prompts) / {val.examples:,} validation" in out
    assert f"tokens: {train.tokens:,} train / {val.tokens:,} validation" in out
    assert tokens.over_length > 0 and tokens.longest > 48
    assert f"over data.max_length: {tokens.over_length:,} examples" in out and f"{tokens.longest:,} tokens" in out
    assert f"positions that train: {train.trained / train.tokens:.1%}" in out
    assert out.count("--- train example") == 3 and out.count(TRAINED[0]) >= 3


def test_trained_spans_are_exactly_the_completion_and_eos(tiny_llama_dir):
    from transformers import AutoTokenizer

    from lora_dist.data import tokenize
    from lora_dist.sources import Example

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    [item] = tokenize([Example("name[The Eagle], area[riverside]\nDescription:", " The Eagle is by the river.")],
                      tok, 128)
    text = render_trained(item, lambda ids: tok.decode(ids, skip_special_tokens=False))
    assert text == "name[The Eagle], area[riverside]\nDescription:« The Eagle is by the river.</s>»"


def test_a_text_source_trains_every_position(tiny_job, tmp_path, capsys):
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"text": f"The Eagle {n} is by the river."}) + "\n" for n in range(20)))
    assert main(["data", str(MAIN_JOB), *tiny_job, "--set=data.source=text", f"--set=data.path={texts}",
                 "--show=1"]) == 0
    out = capsys.readouterr().out
    assert "positions that train: 100.0%" in out and "20 texts" not in out and "texts) /" in out


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_exits_2_before_anything_starts(tiny_job, tmp_path, capsys, case):
    """The data cases of bench/bad_inputs.py, through `data`, `train` and `submit --address`
    (unreachable: the check comes before any contact): exit 2, the file, row and problem named,
    nothing built or written."""
    _, text, overrides, expected = case
    if "source: chat," in text:  # the tiny model's tokenizer has no chat template: give it one, as a user would
        from test_chat import TINY

        text = text.replace("source: chat,", f"source: chat, chat_template: {json.dumps(TINY)},")
    job = tmp_path / "job.yaml"
    job.write_text(text)
    sets = [*tiny_job, *[f"--set={o}" for o in overrides]]
    for command in (["data"], ["train"], ["submit", "--address", "http://127.0.0.1:9"]):
        assert main([*command, str(job), *sets]) == 2, command
        captured = capsys.readouterr()
        said = captured.err.replace(f"{tmp_path}/", "")  # train names the file by its absolute path
        assert expected in said, (command, captured.err)
        assert "model " not in captured.out and not (tmp_path / "runs").exists()
