"""The bad-input table: each case through `lora-dist submit --address <unreachable>`, which must
refuse it with exit code 2 and one message naming the field (at most MAX_MESSAGE characters,
whatever the input), before contacting any cluster. A bad data file (DATA_FILES, written in the
directory the cases run in) is named with its row and the problem.

    python bench/bad_inputs.py            # print the table
    python bench/bad_inputs.py --check    # exit 1 unless every case gets its expected message
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

from lora_dist.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
GOOD = f"name: ok\ndata: {{path: {DATA}}}\n"

MAX_MESSAGE = 2000  # characters: an error message must fit a terminal, whatever the input

GOOD_ROW = '{"prompt": "Q: 1+1?", "completion": " 2"}\n'
DATA_FILES = {
    "no-columns.csv": "a,b\n1,2\n",
    "empty.jsonl": "\n",
    "not-json.jsonl": GOOD_ROW + "{prompt: 1}\n",
    "wrong-type.jsonl": GOOD_ROW + '{"prompt": "Q: 2+2?", "completion": 4}\n',
    "good.jsonl": GOOD_ROW + '{"prompt": "Q: 2+2?", "completion": " 4"}\n',
    "bad-role.jsonl": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]}\n',
    "no-assistant.jsonl": '{"messages": [{"role": "user", "content": "Hi"}]}\n',
    "one-prompt.jsonl": GOOD_ROW * 3,
    "alpaca.jsonl": '{"instruction": "Add.", "input": "1 and 1"}\n',
    "secret.csv": "HF_TOKEN=hf_notToBeQuoted\n",
}


DEEP = "[" * 3000 + "]" * 3000  # 6 KB nested 3,000 deep: Python's parsers recurse
DATA_FILES["deep.jsonl"] = GOOD_ROW + DEEP + "\n"

# Model directories (written under models/ where the cases run): a config.json, or a valid one with
# a bad weight index or safetensors header.
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
SHIFTED = b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [-1000000, -999992]}}'
ONE = b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
WEIGHTS = {"model.safetensors": struct.pack("<Q", len(ONE)) + ONE + bytes(8)}  # valid, matching nothing
MODEL_DIRS = {
    "layers": {"config.json": json.dumps({**TINY, "num_hidden_layers": 20000}), **WEIGHTS},
    "wide": {"config.json": json.dumps({**TINY, "hidden_size": 1 << 20, "intermediate_size": 1 << 22}), **WEIGHTS},
    "heads0": {"config.json": json.dumps({**TINY, "num_attention_heads": 0}), **WEIGHTS},
    "h15": {"config.json": json.dumps({**TINY, "hidden_size": 15, "num_attention_heads": 2}), **WEIGHTS},
    "vocab": {"config.json": json.dumps({**TINY, "vocab_size": -5}), **WEIGHTS},
    "deepconfig": {"config.json": '{"model_type": "llama", "x": %s}' % DEEP},
    "deepindex": {"config.json": json.dumps(TINY), "model.safetensors.index.json": '{"weight_map": %s}' % DEEP},
    "deepheader": {"config.json": json.dumps(TINY), "model.safetensors": struct.pack("<Q", 6000) + DEEP.encode()},
    "shifted": {"config.json": json.dumps(TINY), "model.safetensors": struct.pack("<Q", len(SHIFTED)) + SHIFTED + bytes(8)},
    "bigheader": {"config.json": json.dumps(TINY), "model.safetensors": (200 << 20, b"{")},  # sparse
}


def write_models(root: Path) -> None:
    for name, files in MODEL_DIRS.items():
        d = root / "models" / name
        d.mkdir(parents=True)
        for fname, content in files.items():
            if isinstance(content, tuple):  # (declared header length, first bytes): a sparse file
                with open(d / fname, "wb") as f:
                    f.write(struct.pack("<Q", content[0]) + content[1])
                    f.truncate(8 + content[0])
            else:
                (d / fname).write_bytes(content if isinstance(content, bytes) else content.encode())


def model_job(name: str) -> str:
    return f"name: ok\nmodel: {{base: models/{name}}}\ndata: {{path: {DATA}}}\n"


def jsonl_job(path: str, extra: str = "") -> str:
    return f"name: ok\ndata: {{source: jsonl, path: {path}{extra}}}\n"


# (case, YAML, --set overrides, expected text in the message)
CASES = [
    ("unknown key", GOOD + "trian: {max_steps: 5}\n", [], "trian: unknown key"),
    ("unknown nested key", GOOD + "lora: {rank: 8}\n", [], "lora.rank: unknown key"),
    ("negative lr", GOOD + "train: {lr: -0.001}\n", [], "train.lr: must be in (0, 1]"),
    ("r = 0", GOOD + "lora: {r: 0}\n", [], "lora.r: must be from 1 to 4096"),
    ("r above the layer's dimensions", GOOD + "lora: {r: 1000}\n", [], "lora.r: 1000 exceeds the dimensions"),
    ("target matching no module", GOOD + "lora: {targets: [qkv_proj]}\n", [], "lora.targets: ['qkv_proj'] match no"),
    ("path traversal in name", GOOD.replace("name: ok", "name: ../../etc"), [], "name: must be"),
    ("'..' in output.dir", GOOD + "output: {dir: runs/../../x}\n", [], "output.dir: must not contain '..'"),
    ("percent-encoded '..' in a file:// output.dir", GOOD + "output: {dir: 'file:///r/%2E%2E/escaped'}\n", [],
     "output.dir: must not contain '..'"),
    ("double-encoded '..' in output.dir", GOOD + "output: {dir: 'file:///r/%252E%252E/escaped'}\n", [],
     "output.dir: must not contain '..'"),
    ("file:// output.dir naming a host", GOOD + "output: {dir: 'file://etc/cron.d'}\n", [],
     "output.dir: must not name a host ('etc')"),
    ("data.path /proc/self/environ", "name: ok\ndata: {path: /proc/self/environ}\n", [],
     "is under /proc: a system file or device is never read as training data"),
    ("data.path a device", "name: ok\ndata: {path: /dev/zero}\n", [], "data.path: /dev/zero is under /dev"),
    ("a secret's first line read as CSV columns", "name: ok\ndata: {path: secret.csv}\n", [],
     "found a first line that is not a header of named columns (not quoted"),
    ("non-finite LoRA alpha", GOOD + "lora: {alpha: .inf}\n", [], "lora.alpha: must be a finite number"),
    ("missing data file", "name: ok\ndata: {path: /nonexistent/e2e.csv}\n", [], "data.path: file not found"),
    ("unknown batching mode", GOOD + "data: {batching: sorted}\n", [], "data.batching: must be 'padded', 'grouped' or 'packed'"),
    ("YAML with a Python tag", "name: !!python/object/apply:os.system ['id']\n", [], "YAML tags are not allowed"),
    ("absurd micro-batch", GOOD + "train: {micro_batch_size: 100000000}\n", [],
     "train.micro_batch_size: must be from 1 to 65536"),
    ("absurd sequence length", GOOD + "data: {max_length: 10000000, path: %s}\n" % DATA, [],
     "data.max_length: must be from 8 to 131072"),
    ("override with a wrong type", GOOD, ["train.max_steps=ten"], "train.max_steps: expected an integer"),
    ("runtime_env key off the allow-list", GOOD + "cluster: {runtime_env: {working_dir: /}}\n", [],
     "cluster.runtime_env: keys ['working_dir'] are not allowed"),
    ("full fine-tuning on an int8 base", GOOD + "train: {method: full}\n", [], "train.method: 'full' trains every"),
    ("runtime_env LD_PRELOAD", GOOD + "cluster: {runtime_env: {env_vars: {LD_PRELOAD: /tmp/x.so}}}\n", [],
     "cluster.runtime_env: env_vars: LD_PRELOAD is refused"),
    ("runtime_env PYTHONPATH", GOOD + "cluster: {runtime_env: {env_vars: {PYTHONPATH: /tmp}}}\n", [],
     "cluster.runtime_env: env_vars: PYTHONPATH is refused"),
    ("runtime_env RAY_ variable", GOOD + "cluster: {runtime_env: {env_vars: {RAY_ADDRESS: 'x'}}}\n", [],
     "env_vars: RAY_ADDRESS is refused"),
    ("runtime_env LORA_DIST_ variable", GOOD + "cluster: {runtime_env: {env_vars: {LORA_DIST_CACHE: /}}}\n", [],
     "env_vars: LORA_DIST_CACHE is refused"),
    ("runtime_env PATH", GOOD + "cluster: {runtime_env: {env_vars: {PATH: /tmp}}}\n", [], "env_vars: PATH is refused"),
    ("runtime_env lower-case name", GOOD + "cluster: {runtime_env: {env_vars: {foo: bar}}}\n", [],
     "env_vars: 'foo' is not an allowed name"),
    ("runtime_env non-string value", GOOD + "cluster: {runtime_env: {env_vars: {FOO: 1}}}\n", [],
     "env_vars must map names to string values"),
    ("pip URL", GOOD + "cluster: {runtime_env: {pip: ['https://evil.example/x.whl']}}\n", [],
     "pip: 'https://evil.example/x.whl' is not a plain requirement"),
    ("pip option", GOOD + "cluster: {runtime_env: {pip: ['--index-url=https://evil.example']}}\n", [],
     "is not a plain requirement"),
    ("pip VCS reference", GOOD + "cluster: {runtime_env: {pip: ['git+https://evil.example/x.git']}}\n", [],
     "is not a plain requirement"),
    ("pip local path", GOOD + "cluster: {runtime_env: {pip: ['./x']}}\n", [], "pip: './x' is not a plain requirement"),
    ("YAML alias bomb", GOOD + "lora: {targets: [&a [x, x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], "
     "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c], "
     "[*d, *d, *d, *d, *d, *d, *d, *d, *d]]}\n", [], "more than 10,000 YAML nodes"),
    ("spec over 1 MiB", GOOD + "# " + "x" * (1 << 20) + "\n", [], "a job spec is at most 1,048,576"),
    ("non-finite weight decay", GOOD + "train: {weight_decay: .inf}\n", [], "train.weight_decay: must be a finite"),
    ("NaN learning rate", GOOD + "train: {lr: .nan}\n", [], "train.lr: must be a finite number"),
    ("data.path a directory not from save_to_disk", "name: ok\ndata: {path: /tmp}\n", [],
     "data.path: /tmp: a directory, but not one written by datasets' save_to_disk"),
    ("CSV without the E2E columns", "name: ok\ndata: {path: no-columns.csv}\n", [],
     "data.path: no-columns.csv must be a csv with columns 'mr' and 'ref', found ['a', 'b']"),
    ("CSV without the source's columns", jsonl_job("no-columns.csv"), [],
     "data.path: no-columns.csv: no columns 'prompt', 'completion' (its columns: a, b)"),
    ("empty JSONL", jsonl_job("empty.jsonl"), [], "data.path: empty.jsonl has no examples"),
    ("non-JSON line", jsonl_job("not-json.jsonl"), [], "data.path: not-json.jsonl line 2: not JSON"),
    ("wrong type in a row", jsonl_job("wrong-type.jsonl"), [],
     "data.path: wrong-type.jsonl line 2: expected an object with string fields 'prompt' and 'completion' "
     "(non-empty); 'completion' is int, not a string"),
    ("row without a required column", "name: ok\ndata: {source: alpaca, path: alpaca.jsonl}\n", [],
     "data.path: alpaca.jsonl line 1: expected an object with string fields 'instruction' and 'output'"),
    ("missing val_path", jsonl_job("good.jsonl", ", val_path: missing.jsonl"), [], "data.val_path: file not found"),
    ("empty validation split", jsonl_job("good.jsonl", ", val_path: empty.jsonl"), [],
     "data.val_path: empty.jsonl has no examples"),
    ("a split with one side empty", jsonl_job("one-prompt.jsonl"), [],
     "data.path: one-prompt.jsonl: need at least 2 distinct prompts to split"),
    ("unknown data.columns key", jsonl_job("good.jsonl", ", columns: {question: prompt}"), [],
     "data.columns: ['question'] are not columns of source 'jsonl' (prompt, completion)"),
    ("chat row with an unknown role", "name: ok\ndata: {source: chat, path: bad-role.jsonl}\n", [],
     "data.path: bad-role.jsonl line 1: message 2: role must be one of system, user, assistant, got 'tool'"),
    ("chat row without an assistant turn", "name: ok\ndata: {source: chat, path: no-assistant.jsonl}\n", [],
     "data.path: no-assistant.jsonl line 1: no assistant message"),
    ("chat template on another source", jsonl_job("good.jsonl", ", chat_template: '{{ messages }}'"), [],
     "data.chat_template: only data.source chat renders with a chat template"),
    ("both train.max_steps and train.epochs", GOOD + "train: {max_steps: 5, epochs: 1}\n", [], "train.epochs"),
    ("storage URI without its filesystem", jsonl_job("'s3://bucket/data.jsonl'"), [],
     "data.path: s3://bucket/data.jsonl: cannot open this URI"),
    ("unsupported URI scheme", GOOD + "output: {dir: 'ftp://host/runs'}\n", [], "output.dir: URI scheme 'ftp'"),
    ("negative max_steps", GOOD + "train: {max_steps: -1}\n", [], "train.max_steps: must be"),
    ("dropout above 1", GOOD + "lora: {dropout: 1.5}\n", [], "lora.dropout: must be"),
    ("zero workers", GOOD + "cluster: {workers: 0}\n", [], "cluster.workers: must be"),
    ("--set without a value", GOOD, ["train.max_steps"], "expected KEY=VALUE"),
    ("unknown quantization", GOOD + "model: {quantization: int4}\n", [], "model.quantization: must be"),
    ("unknown ZeRO stage", GOOD, ["cluster.zero_stage=4"], "cluster.zero_stage: must be 'auto', 1, 2 or 3"),
    ("a long hostile value is cut short", GOOD + "lora: {r: '" + "9" * 100000 + "'}\n", [], "lora.r: "),
    ("YAML nested 3,000 deep", GOOD + "lora: {targets: " + DEEP + "}\n", [], "the spec nests deeper than 32 levels"),
    ("--set value nested 3,000 deep", GOOD, ["lora.targets=" + DEEP], "--set lora.targets: the value nests deeper"),
    ("JSONL line nested 3,000 deep", jsonl_job("deep.jsonl"), [], "data.path: deep.jsonl line 2: nested deeper than 64"),
    ("config.json with 20,000 layers", model_job("layers"), [],
     "models/layers/config.json: num_hidden_layers is 20000; expected an integer from 1 to 1,024"),
    ("config.json 2^20 wide", model_job("wide"), [], "models/wide/config.json: hidden_size is 1048576"),
    ("config.json with 0 heads", model_job("heads0"), [], "models/heads0/config.json: num_attention_heads is 0"),
    ("config.json width 15, 2 heads", model_job("h15"), [],
     "models/h15/config.json: hidden_size 15 is not a multiple of num_attention_heads 2"),
    ("config.json vocab_size -5", model_job("vocab"), [], "models/vocab/config.json: vocab_size is -5"),
    ("config.json nested 3,000 deep", model_job("deepconfig"), [],
     "models/deepconfig/config.json is not valid JSON (nested deeper than 64 levels)"),
    ("weight index nested 3,000 deep", model_job("deepindex"), [],
     "models/deepindex/model.safetensors.index.json is not a safetensors index (nested deeper than 64"),
    ("safetensors header nested 3,000 deep", model_job("deepheader"), [],
     "models/deepheader/model.safetensors: not a safetensors file (nested deeper than 64"),
    ("safetensors offsets shifted by -10^6", model_job("shifted"), [],
     "tensor x: data_offsets [-1000000, -999992] outside the file's 8 data bytes"),
    ("safetensors header of 200 MB (sparse file)", model_job("bigheader"), [],
     "its header length is 209,715,200 bytes; safetensors allows at most 100,000,000"),
]


def runtime_env_job(env_vars: str) -> str:
    return GOOD + f"cluster: {{runtime_env: {{env_vars: {{{env_vars}}}}}}}\n"


# runtime_env refusals (issue 31, items 4 and 5), each with the cluster settings it runs under:
# (case, YAML, --set overrides, expected text in the message, environment)
ENV_CASES = [
    *[(f"runtime_env {name} (off the allow-list)", runtime_env_job(f"{name}: x"), [],
       f"env_vars: {name} is not on the allow-list", {})
      for name in ("NCCL_NET_PLUGIN", "OPENSSL_CONF", "GCONV_PATH", "SSL_CERT_FILE", "HTTPS_PROXY", "AWS_ENDPOINT_URL",
                   "AWS_CONFIG_FILE", "HF_ENDPOINT", "MLFLOW_TRACKING_URI")],
    *[(f"runtime_env {name} (a secret)", runtime_env_job(f"{name}: s3cr3t"), [],
       f"env_vars: {name} is refused: it names a secret", {})
      for name in ("HF_TOKEN", "MY_SERVICE_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
                   "GOOGLE_APPLICATION_CREDENTIALS")],
    ("runtime_env a lower-case secret", runtime_env_job("db_secret: s3cr3t"), [],
     "env_vars: 'db_secret' is refused: it names a secret", {}),
    ("runtime_env secret the cluster's list covers", runtime_env_job("MY_API_KEY: s3cr3t"), [],
     "MY_API_KEY is refused: it names a secret", {"LORA_DIST_ALLOW_ENV": "MY_*"}),
    ("runtime_env LD_PRELOAD the cluster's list covers", runtime_env_job("LD_PRELOAD: /tmp/x.so"), [],
     "LD_PRELOAD is refused", {"LORA_DIST_ALLOW_ENV": "LD_*"}),
    ("a malformed LORA_DIST_ALLOW_ENV", runtime_env_job("MY_URL: x"), [], "$LORA_DIST_ALLOW_ENV: 'my url' is not",
     {"LORA_DIST_ALLOW_ENV": "MY_*,my url"}),
    ("pip where the cluster turned it off", GOOD + "cluster: {runtime_env: {pip: ['sentencepiece==0.2.0']}}\n", [],
     "pip is turned off on this cluster ($LORA_DIST_ALLOW_PIP=0)", {"LORA_DIST_ALLOW_PIP": "0"}),
    ("pip under a LORA_DIST_ALLOW_PIP that is neither", GOOD + "cluster: {runtime_env: {pip: ['sentencepiece']}}\n",
     [], "$LORA_DIST_ALLOW_PIP is 'maybe' on this cluster, expected 0 or 1", {"LORA_DIST_ALLOW_PIP": "maybe"}),
]


@contextlib.contextmanager
def environment(settings: dict[str, str]):
    """The cluster settings of a case, for its duration only."""
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(yaml_text: str, overrides: list[str], workdir: Path) -> tuple[int, str]:
    job = workdir / "job.yaml"
    job.write_text(yaml_text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["submit", str(job), "--address", "http://127.0.0.1:9",
                         *[f"--set={o}" for o in overrides]])
    return code, err.getvalue().strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        for name, text in DATA_FILES.items():
            Path(tmp, name).write_text(text)
        write_models(Path(tmp))
        for name, text, overrides, expected, *settings in [*CASES, *ENV_CASES]:
            with environment(settings[0] if settings else {}):
                code, message = run_case(text, overrides, Path(tmp))
            ok = code == 2 and expected in message and len(message) <= MAX_MESSAGE
            failures += not ok
            lines = [ln.strip(" -") for ln in message.splitlines() if ln.strip() and not ln.startswith("error: invalid")]
            shown = (lines[-1] if lines else message).removeprefix("error: ")
            print(f"{'ok ' if ok else 'BAD'} | {name:<45} | exit {code} | {shown}")
    print(f"{len(CASES) + len(ENV_CASES) - failures} passed, {failures} failed")
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
