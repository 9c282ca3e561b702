"""`lora-dist eval ARTIFACT --data FILE` for a non-E2E adapter (evaldata.py): loss per token and
perplexity for the base alone and with the adapter, on the tiny Llama."""

from __future__ import annotations

import io
import json
import math

import pytest

from conftest import MAIN_JOB, TINY_OVERRIDES

from lora_dist.cli import main


@pytest.fixture(scope="module")
def jsonl_adapter(tmp_path_factory, tiny_llama_dir):
    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    work = tmp_path_factory.mktemp("evaldata")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"name[Pub {i}], food[Thai]", "completion": f" Pub {i} serves Thai."})
                            + "\n" for i in range(24)))
    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", "data.source=jsonl", f"data.path={data}",
                                f"output.dir={work / 'runs'}", *TINY_OVERRIDES, "train.max_steps=12",
                                "train.lr=2e-2"])
    return train_local(spec, job_id="evaldata", stream=io.StringIO()), data


def test_eval_data_reports_the_base_and_the_adapter_on_the_file(jsonl_adapter, tiny_llama_dir, capsys, tmp_path):
    from lora_dist.data import tokenize
    from lora_dist.model import load_model
    from lora_dist.sources import read_jsonl
    from lora_dist.train import token_loss
    from lora_dist.data import collate

    artifact, data = jsonl_adapter
    out = tmp_path / "eval.json"
    assert main(["eval", str(artifact), "--data", str(data), "--batch-size", "5", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert "base" in captured.err and "adapter" in captured.err and "perplexity" in captured.err

    # an independent reference: the int8 base with no LoRA at all, on the same tokens
    base = load_model(str(tiny_llama_dir), None, "int8")
    items = tokenize(read_jsonl(data), base.tokenizer, 96)
    total = count = 0
    for i in range(0, len(items), 3):
        loss, n = token_loss(base.model.eval(), collate(items[i:i + 3], base.tokenizer.eos_token_id))
        total, count = total + float(loss), count + n
    completion_tokens = sum(len(base.tokenizer(e.completion, add_special_tokens=False)["input_ids"]) + 1
                            for e in read_jsonl(data))
    assert (result["examples"], result["tokens"], result["source"]) == (24, completion_tokens, "jsonl")
    assert count == completion_tokens
    assert result["base"]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["adapter"]["loss"] < result["base"]["loss"] - 0.1  # it trained on these very examples
    for row in ("base", "adapter"):
        assert result[row]["perplexity"] == pytest.approx(math.exp(result[row]["loss"]))


def test_eval_data_names_a_file_that_is_not_of_the_adapters_source(jsonl_adapter, capsys, tmp_path):
    artifact, _ = jsonl_adapter
    other = tmp_path / "questions.csv"
    other.write_text("question,answer\nwhat,that\n")
    assert main(["eval", str(artifact), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert str(other) in err and "no columns 'prompt', 'completion'" in err  # the columns a jsonl adapter needs


def test_an_e2e_csv_keeps_the_e2e_evaluation_for_any_adapter(jsonl_adapter, capsys):
    from conftest import E2E_CSV

    artifact, _ = jsonl_adapter
    assert main(["eval", str(artifact), "--data", str(E2E_CSV), "--limit", "1", "--num-beams", "1",
                 "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mrs"] == 1 and "BLEU" in result and "base" not in result
