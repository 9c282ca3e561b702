"""Malformed and hostile inputs (issue 31 items 8 and 10): each is refused fast, with exit 2 (or 1
where an artifact check failed) and one message naming the file and the field, never a traceback
and never minutes of work or hundreds of MB first.

The refusals run through the CLI's own ``main`` in this process (its exit code and stderr are
what the console script gives; ``test_refusals_are_one_line_through_the_console_script`` runs
two through the real entry point), each in a thread that must finish within :data:`FAST_S`.
"""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from lora_dist.cli import main
from lora_dist.errors import ModelError

from conftest import E2E_CSV, REPO, run_cli

FAST_S = 20.0  # seconds: a refusal takes well under one; the loaded CI machine is slow
DEEP = "[" * 3000 + "]" * 3000  # about 6 KB


def _run(args: list[str], capsys) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of ``lora-dist ARGS``; fails if it runs past FAST_S."""
    out: dict = {}

    def target() -> None:
        try:
            out["code"] = main(args)
        except BaseException as e:  # noqa: BLE001 - a traceback is what the test reports
            out["error"] = e

    t0 = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(FAST_S)
    assert not thread.is_alive(), f"lora-dist {' '.join(args)} still running after {FAST_S} s"
    assert "error" not in out, f"lora-dist {' '.join(args)} raised {out['error']!r}"
    return out["code"], capsys.readouterr().err, time.perf_counter() - t0


def _one_message(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines, err
    return lines[-1]


@pytest.fixture
def model_dir(tiny_llama_dir, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, d)
    return d


def _job(tmp_path: Path, base: Path | str, extra: str = "") -> str:
    job = tmp_path / "job.yaml"
    job.write_text(f"name: t\nmodel: {{base: {base}}}\ndata: {{path: {E2E_CSV}}}\n{extra}")
    return str(job)


def _edit_config(model_dir: Path, **fields) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(fields)
    (model_dir / "config.json").write_text(json.dumps(config))


UNREACHABLE = ["--address", "http://127.0.0.1:9"]


# --- item 8: what a config.json may declare ------------------------------------------------------

@pytest.mark.parametrize("fields, field", [
    ({"num_hidden_layers": 20000}, "num_hidden_layers is 20000"),
    ({"hidden_size": 2 ** 20, "intermediate_size": 2 ** 22, "head_dim": 2 ** 18}, "hidden_size is 1048576"),
    ({"intermediate_size": 2 ** 22}, "intermediate_size is 4194304"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"vocab_size": -5}, "vocab_size is -5"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers is 2.5"),
])
@pytest.mark.parametrize("command", ["plan", "submit"])
def test_config_sizes_beyond_the_limits_are_refused_fast(model_dir, tmp_path, capsys, fields, field, command):
    """20,000 layers or a 2^20 width kept plan and submit building the meta model for minutes;
    0 heads and a negative vocabulary ended in a traceback. Now: exit 2 at once, naming
    config.json, the field and the limits."""
    _edit_config(model_dir, **fields)
    job = _job(tmp_path, model_dir)
    code, err, seconds = _run(["plan", job] if command == "plan" else ["submit", job, *UNREACHABLE], capsys)
    message = _one_message(err)
    assert code == 2, err
    assert f"{model_dir / 'config.json'}: {field}" in message
    assert "limits: num_hidden_layers 1..1,024, hidden_size 1..65,536" in message
    assert seconds < FAST_S


def test_heads_that_do_not_divide_the_width_are_refused(model_dir, tmp_path, capsys):
    _edit_config(model_dir, hidden_size=15, num_attention_heads=2, head_dim=None)
    code, err, _ = _run(["plan", _job(tmp_path, model_dir)], capsys)
    assert code == 2
    assert "config.json: hidden_size 15 is not a multiple of num_attention_heads 2" in _one_message(err)


def test_real_model_sizes_pass_the_limits():
    """GPT-3 175B and Llama 3.1 405B's sizes (hidden 16384, d_ff 53248, 126 layers, 128 heads, vocab
    128256) and a 256k vocabulary are well inside the limits."""
    from lora_dist.base import check_dimensions

    check_dimensions({"model_type": "gpt2", "n_embd": 12288, "n_layer": 96, "n_head": 96, "n_positions": 2048,
                      "vocab_size": 50257}, "gpt3")
    check_dimensions({"model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                      "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
                      "max_position_embeddings": 131072}, "llama-405b")
    check_dimensions({"model_type": "gemma", "hidden_size": 20480, "num_attention_heads": 96, "head_dim": 256,
                      "vocab_size": 256000, "num_hidden_layers": 126}, "wide")
    with pytest.raises(ModelError, match="n_layer is 20000"):
        check_dimensions({"model_type": "gpt2", "n_layer": 20000}, "gpt2")


def test_the_planners_meta_forward_costs_the_same_at_any_width():
    """The int8 matmul dequantized a meta weight in row blocks too: a 2^22 x 2^20 projection was
    65,536 blocks of meta ops per forward and backward. On meta it is one step at any width."""
    from lora_dist.quant import Int8Linear

    def forward_backward(n_in: int, n_out: int) -> float:
        layer = Int8Linear(n_in, n_out, device="meta")
        x = torch.empty(1, 4, n_in, device="meta", requires_grad=True)
        t0 = time.perf_counter()
        layer(x).sum().backward()
        return time.perf_counter() - t0

    forward_backward(64, 64)  # warm
    assert forward_backward(2 ** 20, 2 ** 22) < 1.0


def test_gpt3_175b_still_plans(capsys):
    code, _, seconds = _run(["plan", str(REPO / "jobs" / "gpt3-175b-lora.yaml"), "--gpus", "8", "--gpu-memory", "80GB"],
                            capsys)
    assert code == 0 and seconds < FAST_S


# --- item 8: a safetensors header ------------------------------------------------------------------

def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _tensors(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _shift(header: dict) -> None:
    for key in _tensors(header):
        header[key]["data_offsets"] = [o - 10 ** 6 for o in header[key]["data_offsets"]]


def _overlap(header: dict) -> None:
    a, b = sorted(_tensors(header), key=lambda k: header[k]["data_offsets"])[:2]
    header[b] = {**header[a]}  # same dtype, shape and bytes as its neighbour


def _past_the_end(header: dict) -> None:
    key = max(_tensors(header), key=lambda k: header[k]["data_offsets"][1])
    header[key]["data_offsets"] = [o + 4096 for o in header[key]["data_offsets"]]


@pytest.mark.parametrize("edit, expected", [
    (_shift, "data_offsets [-1000000, "),
    (_overlap, "overlap (data_offsets)"),
    (_past_the_end, "outside the file's"),
])
def test_data_offsets_are_checked_against_the_file(model_dir, tmp_path, capsys, edit, expected):
    """Offsets shifted by -10^6 passed submit; each tensor's bytes must now lie in the file, match
    dtype x shape and overlap no other tensor's."""
    _rewrite_header(model_dir / "model.safetensors", edit)
    code, err, _ = _run(["submit", _job(tmp_path, model_dir), *UNREACHABLE], capsys)
    message = _one_message(err)
    assert code == 2, err
    assert f"{model_dir / 'model.safetensors'}: not a safetensors file (" in message and expected in message


def test_a_header_above_the_librarys_cap_is_refused_unread(tmp_path):
    """A 4 KB sparse file declaring a 200 MB header: it was read whole (+255 MB) before the JSON
    error; now refused from its 8-byte length, as the safetensors library caps it (100 MB)."""
    from lora_dist.weights import SafetensorsReader

    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 200 << 20) + b"{" + b" " * 4000)
        f.truncate(8 + (200 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match="its header length is 209,715,200 bytes; safetensors allows at most "
                                             "100,000,000"):
            SafetensorsReader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --- item 10: JSON nested 3,000 deep, wherever it is read ------------------------------------------

def test_deep_json_in_config_index_and_header_is_exit_2(model_dir, tmp_path, capsys):
    config = model_dir / "config.json"
    text = config.read_text()
    config.write_text(text.rstrip().rstrip("}") + f', "x": {DEEP}}}')
    code, err, _ = _run(["plan", _job(tmp_path, model_dir)], capsys)
    assert code == 2 and f"{config} is not valid JSON (nested deeper than 64 levels)" in _one_message(err)

    config.write_text(text)
    index = model_dir / "model.safetensors.index.json"
    index.write_text('{"weight_map": %s}' % DEEP)
    code, err, _ = _run(["submit", _job(tmp_path, model_dir), *UNREACHABLE], capsys)
    assert code == 2 and f"{index} is not a safetensors index (nested deeper than 64 levels)" in _one_message(err)

    index.unlink()
    _rewrite_header(model_dir / "model.safetensors", lambda h: h.setdefault("__metadata__", {}).update(x=json.loads(DEEP[:200] + DEEP[-200:])))
    code, err, _ = _run(["submit", _job(tmp_path, model_dir), *UNREACHABLE], capsys)
    assert code == 2 and "model.safetensors: not a safetensors file (nested deeper than 64 levels)" in _one_message(err)


def test_a_deep_hub_index_is_read_like_a_malformed_one(tmp_path):
    """Which weight files to download, from a snapshot's index: a deep index was a RecursionError
    there; now it is malformed like any other (base.weight_files then names it, exit 2)."""
    from lora_dist.hub import SINGLE_WEIGHTS, WEIGHTS_INDEX, _weight_names

    (tmp_path / WEIGHTS_INDEX).write_text('{"weight_map": %s}' % DEEP)
    assert _weight_names(tmp_path) == [SINGLE_WEIGHTS]


def test_a_deep_jsonl_line_is_named_by_its_line(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' + DEEP + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"name: t\ndata: {{source: jsonl, path: {data}}}\n")
    code, err, _ = _run(["submit", str(job), *UNREACHABLE], capsys)
    assert code == 2 and f"data.path: {data} line 2: nested deeper than 64 levels" in _one_message(err)


def test_a_deep_yaml_spec_and_set_value_are_exit_2(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(f"name: t\ndata: {{path: {E2E_CSV}}}\nlora: {{targets: {DEEP}}}\n")
    code, err, _ = _run(["plan", str(job)], capsys)
    assert code == 2 and "the spec nests deeper than 32 levels" in _one_message(err)
    job.write_text(f"name: t\ndata: {{path: {E2E_CSV}}}\n")
    code, err, _ = _run(["plan", str(job), f"--set=lora.targets={DEEP}"], capsys)
    assert code == 2 and "--set lora.targets: the value nests deeper than 32 levels" in _one_message(err)


# --- item 10: manifests ----------------------------------------------------------------------------

@pytest.fixture
def artifact(tmp_path, tiny_llama_dir) -> Path:
    """The recorded artifact, its base moved to this machine's tiny Llama (it was trained on one at
    a path of the machine that recorded it), so that each refusal below is the one reached."""
    d = tmp_path / "artifact"
    shutil.copytree(REPO / "tests" / "data" / "artifact-4eee545", d)
    _edit_manifest(d, lambda m: (m["base_model"].update(id=str(tiny_llama_dir)),
                                 m["spec"]["model"].update(base=str(tiny_llama_dir))))
    return d


def _edit_manifest(artifact: Path, edit) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    edit(manifest)
    manifest.pop("signature", None)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("command", ["verify", "generate"])
@pytest.mark.parametrize("content, expected", [
    (b'{"format": "lora-dist-adapter/1", "files": {}, "x": ' + DEEP.encode() + b"}", "nested deeper than 64 levels"),
    (b'{"format": "lora-dist-adapter/1", "name": "\xff"}', "'utf-8' codec can't decode byte 0xff"),
])
def test_a_bad_manifest_is_exit_1_with_a_message(artifact, capsys, command, content, expected):
    (artifact / "manifest.json").write_bytes(content)
    args = [command, str(artifact)] + (["--prompt", "hi"] if command == "generate" else [])
    code, err, _ = _run(args, capsys)
    assert code == 1 and f"{artifact / 'manifest.json'}: not valid JSON (" in _one_message(err) and expected in err


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.pop("base_model"), "its manifest does not record the base model"),
    (lambda m: m["spec"].pop("lora"), "its manifest's spec.lora is not a LoRA section"),
    (lambda m: m["spec"].update(lora={"r": "many"}), "its manifest's spec.lora is not a LoRA section"),
])
def test_generate_refuses_a_manifest_without_what_loads_the_adapter(artifact, capsys, edit, expected):
    _edit_manifest(artifact, edit)
    code, err, _ = _run(["generate", str(artifact), "--prompt", "hi"], capsys)
    assert code == 1 and f"{artifact}: {expected}" in _one_message(err)


# --- item 10: plan's arguments, a CSV with a byte-order mark -----------------------------------------

@pytest.mark.parametrize("flag, value, expected", [
    ("--gpus", "-1", "--gpus: must be at least 1, got -1"),
    ("--gpus", "0", "--gpus: must be at least 1, got 0"),
    ("--gpu-memory", "1e400", "--gpu-memory: must be a positive size, and finite"),
])
def test_plan_refuses_impossible_arguments(capsys, flag, value, expected):
    code, err, _ = _run(["plan", str(REPO / "jobs" / "gpt3-175b-lora.yaml"), flag, value], capsys)
    assert code == 2 and expected in _one_message(err)


def test_a_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: its first column read as '\\ufeffmr', and the file was
    refused as having no mr column."""
    from lora_dist.evaldata import is_e2e_csv
    from lora_dist.sources import read_e2e

    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + E2E_CSV.read_bytes())
    assert is_e2e_csv(bom)
    assert read_e2e(bom) == read_e2e(E2E_CSV)


def test_refusals_are_one_line_through_the_console_script(model_dir, tmp_path):
    """Two refusals through the real entry point: exit 2 and one line, no traceback."""
    _edit_config(model_dir, num_attention_heads=0)
    proc = run_cli("plan", _job(tmp_path, model_dir), cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 2 and "num_attention_heads is 0" in proc.stderr and "Traceback" not in proc.stderr
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"name: t\ndata: {{path: {E2E_CSV}}}\nx: {DEEP}\n")
    proc = run_cli("plan", str(deep), cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 2 and "nests deeper than 32 levels" in proc.stderr and "Traceback" not in proc.stderr
