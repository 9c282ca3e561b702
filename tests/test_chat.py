"""Chat conversations (data.source: chat): reading, the exact train mask on three template styles,
over-length, packing, the split, the cache, the checks before submit, and a chat adapter's
artifact, generation and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import E2E_CSV, MAIN_JOB, REPO, TINY_OVERRIDES, run_cli

CHAT_JOB = REPO / "jobs" / "smollm2-chat.yaml"
CHAT_DATA = REPO / "jobs" / "data" / "e2e" / "devset-chat.jsonl"

# Llama-3's and Mistral's templates, reduced to what places the turns (the released ones add dates
# and tool calls around the same structure).
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are "
           "supported!') }}{% endif %}{% endfor %}")
# for the tiny Llama, whose tokenizer has no template and one special token (</s>)
TINY = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")

TURNS = [("user", "Hi there, who are you?", 1), ("assistant", "I am a small model. How can I help?", 1),
         ("user", "Name a colour.", 1), ("assistant", "Blue, I think.", 0),
         ("user", "And a number?", 1), ("assistant", "Seven.", 1)]



def read_chat_file(path):
    """The conversations of a JSONL file, read as a chat job reads its data."""
    from lora_dist.datafiles import DataFile
    from lora_dist.sources import read_chat

    return read_chat(DataFile(str(path)))


def _rows_file(tmp_path, rows) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

def _tokenizer(smollm2_dir, **special):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    if special:
        tok.add_special_tokens(special)
    return tok


def _trained_runs(ids, mask) -> list[list[int]]:
    """The trained tokens as runs of consecutive positions."""
    runs, prev = [], False
    for x, m in zip(ids, mask):
        if m:
            runs[-1:] = [runs[-1] + [x]] if prev else runs[-1:] + [[x]]
        prev = bool(m)
    return runs


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_the_mask_trains_exactly_each_assistant_turn_and_its_end_of_turn(smollm2_dir, style):
    """On SmolLM2's own ChatML, a Llama-3 and a Mistral [INST] template, the trained tokens decode
    to exactly each weight-1 assistant content plus its end-of-turn token: no role header, no
    system or user token, no whitespace after end-of-turn, nothing of the weight-0 turn."""
    from lora_dist.chat import encode, end_of_turn

    if style == "chatml":
        tok, eot, turns = _tokenizer(smollm2_dir), "<|im_end|>", [("system", "Be brief.", 1), *TURNS]
        template = tok.chat_template
        assert "<|im_start|>" in template  # SmolLM2's GGUF conversion keeps its ChatML template
    elif style == "llama3":
        tok = _tokenizer(smollm2_dir, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                         additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
        template, eot, turns = LLAMA3, "<|eot_id|>", [("system", "Be brief.", 1), *TURNS]
    else:
        tok, template, eot, turns = _tokenizer(smollm2_dir, bos_token="<s>", eos_token="</s>"), MISTRAL, "</s>", TURNS
    ids, mask, ends = encode(tok, template, turns)
    wanted = [content + eot for role, content, weight in turns if role == "assistant" and weight]
    assert [tok.decode(run) for run in _trained_runs(ids, mask)] == wanted
    assert len(ends) == 3 and all(tok.convert_ids_to_tokens(ids[e - 1]) == eot for e in ends)
    assert tok.convert_ids_to_tokens(end_of_turn(tok, template)) == eot


def test_a_template_that_rewrites_earlier_turns_or_cannot_stop_is_refused(smollm2_dir):
    from lora_dist.chat import encode, end_of_turn
    from lora_dist.sources import DataError

    tok = _tokenizer(smollm2_dir)
    rewrites = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="prefix of its continuation"):
        encode(tok, rewrites, TURNS)
    no_stop = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}" \
              "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(DataError, match="not with a special token"):
        end_of_turn(tok, no_stop)
    with pytest.raises(DataError, match="rendering failed"):
        encode(_tokenizer(smollm2_dir, bos_token="<s>", eos_token="</s>"), MISTRAL, [("system", "x", 1), *TURNS])


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "x"}, 'non-empty "messages" list'),
    ({"messages": []}, 'non-empty "messages" list'),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role must be one of system, user, assistant, got 'tool'"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "message 1 (user): content must be a string, got list"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]},
     "message 1 (user): weight must be 0 or 1"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
     "message 2 (assistant): weight must be 0 or 1"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": True}]},
     "weight must be 0 or 1"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
     "every assistant message has weight 0"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]},
     "must be a user message, got 'assistant'"),
])
def test_bad_rows_are_named_by_file_row_and_problem(tmp_path, row, problem):
    from lora_dist.sources import DataError

    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        read_chat_file(path)
    assert f"{path} line 3: " in str(e.value) and problem in str(e.value)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2: not JSON"):
        read_chat_file(path)


def test_over_length_conversations_are_cut_at_a_turn_or_dropped_and_counted(smollm2_dir, tmp_path):
    from lora_dist.chat import encode, tokenize_chat

    tok = _tokenizer(smollm2_dir)
    template = tok.chat_template
    turns = [{"role": r, "content": c, "weight": w} if r == "assistant" else {"role": r, "content": c}
             for r, c, w in TURNS]
    convs = read_chat_file(_rows_file(tmp_path, [{"messages": turns}, {"messages": turns[:2]}]))
    ids, mask, ends = encode(tok, template, convs[0].messages)
    limit = ends[2] - 1  # the third assistant turn does not fit, the second (weight 0) and first do
    got = tokenize_chat(convs, tok, template, limit)
    assert got.counts() == {"over_length": 1, "cut": 1, "dropped": 0, "longest": len(ids)}
    assert got.items[0] == (ids[:ends[1]], mask[:ends[1]])  # ends on the weight-0 turn's end-of-turn
    assert got.items[1] == tuple(encode(tok, template, convs[1].messages)[:2])
    dropped = tokenize_chat(convs, tok, template, ends[0] - 1)  # not even the first assistant turn fits
    assert dropped.counts()["dropped"] == 2 and dropped.items == []


def test_chat_splits_hold_out_the_e2e_restaurants_else_by_prompt(tmp_path):
    from lora_dist.sources import read_e2e, split_examples
    from lora_dist.spec import load_spec

    e2e, chat = load_spec(MAIN_JOB).data, load_spec(CHAT_JOB).data
    e_train, e_val = split_examples(read_e2e(E2E_CSV), e2e)
    c_train, c_val = split_examples(read_chat_file(CHAT_DATA), chat)
    assert {e.name for e in c_val} == {e.name for e in e_val} and len(c_val) == len(e_val)
    assert [e.completion for e in c_train] == [e.completion.strip() for e in e_train]  # same rows, same order
    rows = [{"messages": [{"role": "user", "content": f"question {n % 7}"}, {"role": "assistant", "content": f"answer {n}"}]}
            for n in range(50)]
    train, val = split_examples(read_chat_file(_rows_file(tmp_path, rows)), chat)
    assert val and not {e.prompt for e in train} & {e.prompt for e in val}


def test_tokenized_chat_is_cached_keyed_by_template_and_packs_like_unpacked(smollm2_dir, tmp_path):
    import torch

    from lora_dist.data import BatchPlan, IGNORE_INDEX, collate, collate_packed, tokenized
    from lora_dist.spec import DataSpec

    tok = _tokenizer(smollm2_dir)
    spec = DataSpec(source="chat", path=str(CHAT_DATA), max_length=120, max_val_examples=10_000)
    said = []
    cold = tokenized(spec, tok, tmp_path, say=said.append)
    warm = tokenized(spec, tok, tmp_path)
    assert (cold.cache, warm.cache) == ("miss", "hit") and warm.chat_over_length == cold.chat_over_length
    over = cold.chat_over_length
    # one assistant turn each: dropped whole, or cut just after it (before the newline that follows it)
    assert over["over_length"] == over["cut"] + over["dropped"] and over["dropped"] > 0 and over["longest"] > 120
    assert f"{over['over_length']} conversations over data.max_length 120" in said[0]
    assert len(cold.train) + len(cold.val) + over["dropped"] == 4672
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    first = warm.train[0]
    trained = [x for x in first.labels if x != IGNORE_INDEX]
    assert trained[-1] == eot and tok.decode(trained).startswith("There is a place")
    other = DataSpec(source="chat", path=str(CHAT_DATA), max_length=120,
                     chat_template=tok.chat_template.replace("a helpful AI", "a useful AI"))
    assert tokenized(other, tok, tmp_path).cache == "miss"

    lengths = warm.train.lengths()
    plan = BatchPlan(len(warm.train), 4, seed=1, lengths=lengths, mode="packed", capacity=120)
    rows = plan.rows(0)
    packed = collate_packed([[warm.train[j] for j in row] for row in rows], pad_id=0)
    for r, row in enumerate(rows):
        alone = collate([warm.train[j] for j in row], pad_id=0)["labels"]
        assert torch.equal(packed["labels"][r][packed["labels"][r] != IGNORE_INDEX], alone[alone != IGNORE_INDEX])


def _tiny_chat_job(tmp_path: Path, tiny_llama_dir, **data) -> Path:
    raw = yaml.safe_load(MAIN_JOB.read_text())
    raw["model"]["base"] = str(tiny_llama_dir)
    raw["data"] = {**raw["data"], "source": "chat", "path": str(CHAT_DATA), "max_length": 96, **data}
    raw["output"]["dir"] = str(tmp_path / "runs")
    job = tmp_path / "chat.yaml"
    job.write_text(yaml.safe_dump(raw))
    return job


def test_a_model_without_a_chat_template_is_refused_before_anything_is_built(tmp_path, tiny_llama_dir):
    proc = run_cli("train", str(_tiny_chat_job(tmp_path, tiny_llama_dir)), cwd=REPO, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "tokenizer has none: set data.chat_template" in proc.stderr and "Traceback" not in proc.stderr
    bad = _tiny_chat_job(tmp_path, tiny_llama_dir, chat_template=TINY.replace("{{ eos_token }}", ""))
    proc = run_cli("train", str(bad), cwd=REPO, check=False)
    assert proc.returncode == 2 and "not with a special token" in proc.stderr, proc.stderr
    raw = yaml.safe_load(MAIN_JOB.read_text())
    raw["data"]["chat_template"] = TINY
    (tmp_path / "e2e.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli("train", str(tmp_path / "e2e.yaml"), cwd=REPO, check=False)
    assert proc.returncode == 2 and "only data.source chat" in proc.stderr, proc.stderr


def test_the_chat_check_runs_wherever_a_job_is_trained_or_submitted(tmp_path, tiny_llama_dir):
    from lora_dist.sources import DataError
    from lora_dist.spec import load_spec
    from lora_dist.validate import CHECKS, validate_job

    spec = load_spec(_tiny_chat_job(tmp_path, tiny_llama_dir))
    assert [w for w, checks in CHECKS.items() if "chat" in checks] == ["train", "submit", "remote"]
    for where in ("train", "submit", "remote"):
        with pytest.raises(DataError, match="set data.chat_template"):
            validate_job(spec, where)
    validate_job(load_spec(_tiny_chat_job(tmp_path, tiny_llama_dir, chat_template=TINY)), "submit")


def test_a_chat_adapter_records_its_template_and_generates_and_evaluates_with_it(tmp_path, tiny_llama_dir):
    """The tiny Llama trained on the chat data with data.chat_template: the manifest records the
    template; generate --chat and eval prompt through it; --chat on an E2E artifact is refused."""
    import hashlib

    from lora_dist.adapter import load_adapted
    from lora_dist.generate import chat_prompt, e2e_template, stop_ids

    job = _tiny_chat_job(tmp_path, tiny_llama_dir, chat_template=TINY)
    proc = run_cli("train", str(job), *[f"--set={o}" for o in TINY_OVERRIDES if "max_length" not in o], cwd=REPO)
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["data"]["chat_template"] == TINY
    assert manifest["data"]["chat_template_sha256"] == hashlib.sha256(TINY.encode()).hexdigest()
    loaded, m = load_adapted(artifact)
    tok = loaded.tokenizer
    assert chat_prompt(m, tok, "Hi", system="Be brief.") == "system: Be brief.\nuser: Hi\nassistant: "
    assert e2e_template(m, tok) == "user: Describe the restaurant in one sentence.\nAttributes: {input}\nassistant: "
    assert stop_ids(m, tok) == [tok.eos_token_id]
    run_cli("generate", str(artifact), "--chat", "Describe the restaurant in one sentence.\nAttributes: "
            "name[Alimentum]", "--system", "Be brief.", "--max-new-tokens", "8", cwd=REPO)  # a random tiny model's
    # reply may be empty: what it says is the slow test's (SmolLM2)
    scored = run_cli("eval", str(artifact), "--data", str(E2E_CSV), "--limit", "2", "--num-beams", "1",
                     "--max-new-tokens", "8", cwd=REPO)
    assert json.loads(scored.stdout.strip().splitlines()[-1])["mrs"] == 2
    # eval --data on conversations: the loss on the tokens training trains, through the recorded template
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(CHAT_DATA.read_text().splitlines(keepends=True)[:12]))
    result = json.loads(run_cli("eval", str(artifact), "--data", str(convs), cwd=REPO).stdout.strip().splitlines()[-1])
    from lora_dist.chat import encode

    trained = sum(sum(encode(tok, TINY, c.messages)[1][1:]) for c in read_chat_file(convs))
    assert (result["source"], result["examples"], result["tokens"]) == ("chat", 12, trained)
    assert result["adapter"]["loss"] > 0 and result["base"]["loss"] > 0


def test_generate_chat_on_an_adapter_without_a_chat_template_exits_2(tiny_trained):
    artifact, _ = tiny_trained
    proc = run_cli("generate", str(artifact), "--chat", "Hi", cwd=REPO, check=False)
    assert proc.returncode == 2 and "not chat, so it has no chat template" in proc.stderr, proc.stderr
    proc = run_cli("generate", str(artifact), "--prompt", "name[x]", "--system", "Be brief.", cwd=REPO, check=False)
    assert proc.returncode == 2 and "goes with --chat" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_smollm2_chat_adapter_replies_and_stops_at_the_end_of_turn(chat_trained):
    """A few steps of the chat job on SmolLM2: greedy generate --chat ends its reply with
    <|im_end|> well before the token limit."""
    import torch

    from lora_dist.adapter import load_adapted
    from lora_dist.generate import chat_prompt, stop_ids

    artifact = chat_trained
    message = "Describe the restaurant in one sentence.\nAttributes: name[The Vaults], eatType[pub], area[riverside]"
    reply = run_cli("generate", str(artifact), "--chat", message, "--max-new-tokens", "64", cwd=REPO).stdout.strip()
    assert reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply
    loaded, manifest = load_adapted(artifact)
    tok = loaded.tokenizer
    ids = tok(chat_prompt(manifest, tok, message), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, max_new_tokens=64, do_sample=False,
                                    eos_token_id=stop_ids(manifest, tok), pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(new) < 64
    assert tok.decode(new, skip_special_tokens=True).strip() == reply
