"""``lora-dist serve``: many adapters over one base, batched together, OpenAI-compatible.

The fast tests run the replica's work (``served.Replica``: the base once, each row's adapter, one
decode) on the tiny models, and every refusal that happens before Ray starts. The slow test
starts the real server (embedded Ray, Ray Serve, FastAPI) on SmolLM2 and talks to it with the
``openai`` client.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import E2E_CSV, MAIN_JOB, REPO, TINY_OVERRIDES, run_cli

sys.path.insert(0, str(REPO / "bench"))
from layouts import LAYOUTS, write_layout  # noqa: E402

MR = "name[The Eagle], eatType[coffee shop], food[French], area[riverside]"
MRS = [MR, "name[Zizzi], eatType[pub], customer rating[high]", "name[Loch Fyne], food[Japanese]"]


def tiny_adapter(base_dir, out, seed: int, targets=None):
    """A short real single-process run on a tiny base (as conftest's tiny_trained)."""
    import io

    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    extra = [f"lora.targets={json.dumps(list(targets))}"] if targets else []
    spec = load_spec(MAIN_JOB, [f"model.base={base_dir}", f"data.path={E2E_CSV}", f"output.dir={out}",
                                *TINY_OVERRIDES, f"train.seed={seed}", "train.lr=2e-2", *extra])
    return train_local(spec, job_id=f"s{seed}", stream=io.StringIO())


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny_llama_dir, tiny_trained):
    """Two adapters over the tiny Llama that answer the same prompt differently."""
    return [tiny_trained[0], tiny_adapter(tiny_llama_dir, tmp_path_factory.mktemp("second") / "runs", seed=7)]


def replica_for(base_dir, adapters):
    from lora_dist.served import AdapterRef, Replica
    from lora_dist.store import manifest_digest

    return Replica(str(base_dir), "int8", {a.name: AdapterRef(str(a), manifest_digest(a)) for a in adapters})


def request(prompt=MR, **fields):
    return {"model": "m", "kind": "completion", "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
            "top_p": 1.0, "seed": None, "stop": [], **fields}


def generated(artifact, prompts, max_new_tokens=12):
    """``lora-dist generate``'s greedy text for each prompt (the artifact loaded once)."""
    from lora_dist.adapter import load_adapted
    from lora_dist.generate import format_prompt, generate, stop_ids, uses_bos

    loaded, manifest = load_adapted(artifact)
    tok = loaded.tokenizer
    return [generate(loaded.model, tok, [format_prompt(manifest, p)], max_new_tokens=max_new_tokens,
                     bos=uses_bos(manifest), stop=stop_ids(manifest, tok))[0] for p in prompts]


def test_one_batch_of_different_adapters_answers_as_each_alone(tiny_pair, tiny_llama_dir):
    """Rows for two adapters and the bare base, decoded as one batch over one int8 base, give each
    adapter's `generate` text (greedy), and the two adapters answer differently."""
    replica = replica_for(tiny_llama_dir, tiny_pair)
    loaded = [replica.load(a.name) for a in tiny_pair]
    rows, adapters = [], []
    for prompt in MRS:
        for a in loaded + [None]:
            rows.append(replica.prepare(request(prompt), a))
            adapters.append(a)
    texts = [c.text for c in replica.run(rows, adapters)]
    for k, art in enumerate(tiny_pair):
        assert texts[k::3] == generated(art, MRS)
    assert texts[0::3] != texts[1::3]
    assert texts[2::3] != texts[0::3]  # the base row got no adapter's term


def test_a_fused_qkv_adapter_is_served_on_its_slices(tmp_path, tiny_llama_dir):
    """GPT-2's c_attn adapter (q and v slices, exported block-structured) served over the int8
    base gives `generate`'s text."""
    base = write_layout("gpt2", tmp_path / "gpt2", tiny_llama_dir)
    art = tiny_adapter(base, tmp_path / "runs", seed=3, targets=LAYOUTS["gpt2"][4])
    replica = replica_for(base, [art])
    adapter = replica.load(art.name)
    texts = [c.text for c in replica.run([replica.prepare(request(p), adapter) for p in MRS], [adapter] * 3)]
    assert texts == generated(art, MRS)


def test_sampling_follows_seed_temperature_and_stop(tiny_pair, tiny_llama_dir):
    replica = replica_for(tiny_llama_dir, tiny_pair[:1])
    a = replica.load(tiny_pair[0].name)
    sampled = request(temperature=1.5, seed=11, max_tokens=10)
    one, two = replica.run([replica.prepare(sampled, a), replica.prepare(sampled, a)], [a, a])
    assert one.text == two.text  # the same seed, the same text, whatever row it ran in
    other = replica.run([replica.prepare({**sampled, "seed": 12}, a)], [a])[0]
    assert other.text != one.text
    nucleus = replica.run([replica.prepare({**sampled, "top_p": 1e-9}, a)], [a])[0]  # top-p ~0: argmax
    assert nucleus.text == replica.run([replica.prepare(request(max_tokens=10), a)], [a])[0].text
    full = replica.run([replica.prepare(request(max_tokens=12), a)], [a])[0].text
    assert len(full) > 4, full
    word = full[len(full) // 2:len(full) // 2 + 2]
    cut = replica.run([replica.prepare(request(max_tokens=12, stop=[word]), a)], [a])[0]
    assert cut.finish_reason == "stop" and full.startswith(cut.text) and len(cut.text) <= len(full) // 2, (full, cut)


def test_the_replica_refuses_a_changed_adapter_and_an_overlong_prompt(tiny_pair, tiny_llama_dir, tmp_path):
    from lora_dist.errors import ArtifactError
    from lora_dist.served import RequestError

    copy = tmp_path / tiny_pair[1].name
    shutil.copytree(tiny_pair[1], copy)
    replica = replica_for(tiny_llama_dir, [tiny_pair[0], copy])
    data = copy / "adapter_model.safetensors"
    data.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)  # changed after the server verified it
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        replica.load(copy.name)
    good = replica.load(tiny_pair[0].name)  # the other adapter still loads and runs
    with pytest.raises(RequestError) as e:
        replica.prepare(request(prompt="name " * 300), good)
    assert e.value.code == "context_length_exceeded" and "256 tokens" in str(e.value)
    with pytest.raises(RequestError, match="not trained on chat"):
        replica.prepare({**request(), "kind": "chat", "messages": [{"role": "user", "content": "hi"}]}, good)


@pytest.mark.parametrize("body, field", [
    ([], "JSON object"), ({"prompt": "x"}, "model"), ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed"),
    ({"model": "m", "prompt": "x", "stream": True}, "stream"),
    ({"model": "m", "prompt": "x", "n": 2}, "n"),
])
def test_bad_requests_name_their_field(body, field):
    from lora_dist.served import RequestError
    from lora_dist.serving import parse_request

    with pytest.raises(RequestError, match=field):
        parse_request(body, "completion")


def test_chat_messages_are_checked():
    from lora_dist.served import RequestError
    from lora_dist.serving import parse_request

    ok = parse_request({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "chat")
    assert ok["messages"] == [{"role": "user", "content": "hi"}] and ok["max_tokens"] == 256
    for messages in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": 3}]):
        with pytest.raises(RequestError, match="messages"):
            parse_request({"model": "m", "messages": messages}, "chat")


def test_serve_refuses_to_start_without_a_token_or_with_bad_adapters(tmp_path, tiny_trained):
    env = {k: v for k, v in os.environ.items() if k != "LORA_DIST_SERVE_TOKEN"}
    art = str(tiny_trained[0])
    no_token = run_cli("serve", art, cwd=tmp_path, check=False, env=env)
    assert no_token.returncode == 2 and "needs a bearer token" in no_token.stderr
    open_port = run_cli("serve", art, "--no-auth", "--host", "0.0.0.0", cwd=tmp_path, check=False, env=env)
    assert open_port.returncode == 2 and "only with --host 127.0.0.1" in open_port.stderr
    (tmp_path / "short").write_text("abc\n")
    short = run_cli("serve", art, "--token-file", str(tmp_path / "short"), cwd=tmp_path, check=False, env=env)
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
    (tmp_path / "tok").write_text("t" * 32)
    none_left = run_cli("serve", str(tmp_path / "missing"), "nosuchjob", "--token-file", str(tmp_path / "tok"),
                        cwd=tmp_path, check=False, env=env)
    assert none_left.returncode == 1, none_left.stderr
    assert "refused nosuchjob" in none_left.stderr and "no adapter to serve" in none_left.stderr
    assert "Traceback" not in no_token.stderr + open_port.stderr + short.stderr + none_left.stderr


# --- the real server -------------------------------------------------------------------------------

def start_server(args, cwd, env, timeout=600):
    """`lora-dist serve ...` in the background; returns (process, its ready line) once it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "lora_dist.cli", "serve", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=open(cwd / "serve.err", "w"), text=True)
    deadline = time.time() + timeout
    line = ""
    while time.time() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if line.startswith("serving "):
            return proc, line
    proc.kill()
    raise AssertionError(f"serve did not start: {line}\n{(cwd / 'serve.err').read_text()[-4000:]}")


def stop_server(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_two_adapters_through_the_openai_client(trained, chat_trained, tmp_path):
    """The real server on the embedded default (Ray Serve), SmolLM2 int8: an E2E adapter and a chat
    adapter answer one prompt differently, each as `generate` does; the chat adapter answers
    /v1/chat/completions; 401, 404 and 400 as OpenAI's; a tampered adapter is refused at start and
    the others keep serving."""
    import openai

    from lora_dist.generate import generate_from_artifact

    e2e, chat = trained[0], chat_trained
    tampered = tmp_path / "tampered"
    shutil.copytree(e2e, tampered)
    (tampered / "adapter_config.json").write_text((tampered / "adapter_config.json").read_text() + " ")
    token = "s3cret-" + os.urandom(12).hex()
    (tmp_path / "token").write_text(token + "\n")
    port = free_port()
    proc, ready = start_server([f"e2e={e2e}", f"chat={chat}", f"bad={tampered}", "--token-file",
                                str(tmp_path / "token"), "--port", str(port)], tmp_path, dict(os.environ))
    try:
        assert "e2e" in ready and "chat" in ready and "bad" not in ready
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)
        models = {m.id for m in client.models.list().data}
        assert {"e2e", "chat", "smollm2-135m"} <= models and "bad" not in models
        replies = {m: client.completions.create(model=m, prompt=MR, max_tokens=40, temperature=0).choices[0].text
                   for m in ("e2e", "chat")}
        assert replies["e2e"] != replies["chat"]
        assert replies["e2e"] == generate_from_artifact(e2e, MR, max_new_tokens=40)
        assert replies["chat"] == generate_from_artifact(chat, MR, max_new_tokens=40)
        question = "Describe a coffee shop called The Eagle."
        answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": question}],
                                                max_tokens=40, temperature=0)
        assert answer.choices[0].message.content == generate_from_artifact(chat, question, chat=True,
                                                                           max_new_tokens=40)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong" * 4, max_retries=0).models.list()
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="nope", prompt=MR)
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.NotFoundError, match="sha256 mismatch"):  # refused at start, with its reason
            client.completions.create(model="bad", prompt=MR)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="e2e", prompt="word " * 9000, max_tokens=4)
        assert e.value.body["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError, match="not trained on chat"):
            client.chat.completions.create(model="e2e", messages=[{"role": "user", "content": "hi"}])
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:  # requests for both adapters at once: one batch, each its own reply
            together = list(pool.map(lambda m: client.completions.create(model=m, prompt=MR, max_tokens=40,
                                                                         temperature=0).choices[0].text,
                                     ["e2e", "chat", "e2e", "chat"]))
        assert together == [replies["e2e"], replies["chat"]] * 2
        stats = json.loads(subprocess.run(["curl", "-s", "-H", f"Authorization: Bearer {token}",
                                           f"http://127.0.0.1:{port}/lora-dist/stats"],
                                          capture_output=True, text=True, check=True).stdout)
        assert set(stats["smollm2-135m"]["adapter_load_seconds"]) == {"e2e", "chat"}
        assert stats["smollm2-135m"]["most_adapters_in_a_batch"] == 2, stats  # both adapters in one batch
        assert client.completions.create(model="e2e", prompt=MR, max_tokens=40, temperature=0).choices[0].text == \
            replies["e2e"]  # still serving after the errors
    finally:
        stop_server(proc)
    log = (tmp_path / "serve.err").read_text()
    assert "refused bad=" in log and "sha256 mismatch" in log
    assert token not in log
