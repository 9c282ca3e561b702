"""The one training loop: the single-process path on a tiny model (fast), and the real entry
point end to end on SmolLM2 with E2E data (slow)."""

import io
import json
import math
import os
from pathlib import Path

import pytest
import torch

from lora_dist import store
from lora_dist.spec import load_spec

from conftest import E2E_CSV, MAIN_JOB, REPO, TINY_OVERRIDES, run_cli


def _metrics(artifact: Path) -> list[dict]:
    return [json.loads(line) for line in (artifact / store.METRICS_FILE).read_text().splitlines()]


def test_single_process_run_records_every_step_and_writes_a_verified_artifact(tiny_trained):
    artifact, log = tiny_trained
    manifest = store.verify_artifact(artifact)
    assert set(manifest.files) == {store.ADAPTER_FILE, store.CONFIG_FILE, store.METRICS_FILE,
                                      store.LOSS_CURVE_FILE}
    assert manifest.world_size == 1 and manifest.zero_stage == 0 and manifest.steps == 4
    # r=4 on all 7 linears of 2 blocks, r * (in + out) each: q, o 64x64; k, v 64->32; gate, up, down 64<->128
    assert manifest.trainable_params == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert manifest.data.prompt_template == "Describe the restaurant in one sentence.\nAttributes: {input}\nDescription:"
    steps = [m for m in _metrics(artifact) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:  # the same record on every path: loss, lr, throughput, memory, int8 bytes
        assert {"lr", "tokens_per_s", "step_s", "peak_memory_bytes", "int8_partition_bytes", "tokens", "pad_tokens",
                "real_tokens_per_s"} <= set(m)
        assert m["int8_partition_bytes"] == [2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 64 * 128)]
    vals = [m for m in _metrics(artifact) if "val_loss" in m]
    assert [v["step"] for v in vals] == [0, 4]
    assert "step 1/4  loss" in log and "tok/s" in log and "MFU " in log and "step 0  val_loss" in log  # progress
    # MFU: the model FLOPs achieved over this process's measured GEMM peak, the mean of steps 2-4 kept
    assert manifest.model_flops_per_token > 0 and manifest.peak_flops_per_s > 0 and manifest.torch_threads >= 1
    for m in steps:
        assert m["mfu"] == pytest.approx(m["model_flops_per_s"] / manifest.peak_flops_per_s)
        assert 0 < m["mfu"] < 1  # a peak the job beat would be no peak
        assert m["model_flops_per_s"] * m["step_s"] > manifest.model_flops_per_token * m["tokens"]  # + attention
    assert manifest.mfu == pytest.approx(sum(m["mfu"] for m in steps[1:]) / 3)
    assert not list(artifact.parent.glob(".*")), "no partial or work directories left behind"


def test_learning_rate_follows_transformers_warmup_then_linear_decay(tiny_trained):
    from transformers import get_linear_schedule_with_warmup

    artifact, _ = tiny_trained
    lrs = [m["lr"] for m in _metrics(artifact) if "loss" in m]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-3)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=4)
    expected = []
    for _ in range(4):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


def test_loss_curve_is_a_matplotlib_png_with_both_losses(tiny_trained, tmp_path):
    from PIL import Image

    from lora_dist.plot import loss_curve_png

    artifact, _ = tiny_trained
    with Image.open(artifact / store.LOSS_CURVE_FILE) as im:
        assert im.format == "PNG" and im.size == (640, 400)
        colors = {c for _, c in im.convert("RGB").getcolors(640 * 400)}
    assert (31, 119, 180) in colors and (214, 39, 40) in colors  # tab:blue training, tab:red validation
    only_train = tmp_path / "m.jsonl"
    only_train.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with Image.open(loss_curve_png(only_train, tmp_path / "c.png")) as im:
        assert (214, 39, 40) not in {c for _, c in im.convert("RGB").getcolors(640 * 400)}


def test_the_reference_at_world_size_n_averages_every_ranks_batches(tiny_llama_dir):
    """The parity reference: one process over the batches of N workers. Its first loss is the
    mean of each rank's first batch under the fresh (B = 0) adapter, computed here directly."""
    from lora_dist.device import local_placement
    from lora_dist.train import Loop, Metrics, RunResult, build_local, global_index, micro_batch, prepare_data, \
        reference_losses, run_steps, seed_batch, train_step, LocalRunner

    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}", *TINY_OVERRIDES])
    losses = reference_losses(spec, world_size=2, steps=2)
    built = build_local(spec, local_placement(spec))
    data = prepare_data(spec, built.tokenizer)
    loop = Loop(spec, LocalRunner(built.model, spec, 2), data, torch.device("cpu"), [0, 1], 2,
                Metrics(Path("/dev/null"), spec, main=False))
    built.model.train()
    by_hand = []
    for rank in (0, 1):
        index = global_index(1, 0, rank, 1, 2)
        seed_batch(spec.train.seed, index)
        with torch.no_grad():
            by_hand.append(float(built.model(**micro_batch(data, loop.plan, index)).loss))
    assert len(losses) == 2 and losses[0] == pytest.approx(sum(by_hand) / 2, abs=1e-6)
    assert losses[1] != losses[0]
    # what a step reports it trained: the real tokens of its batches, and the padding around them
    out = train_step(loop, 1)
    batches = [micro_batch(data, loop.plan, global_index(1, 0, rank, 1, 2)) for rank in (0, 1)]
    assert out.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert out.pad_tokens == sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    # the loop goes on from there, checked against the reference, and says how it ended
    loop.reference = losses
    run = run_steps(loop, start=2)
    assert isinstance(run, RunResult) and run.parity_max is not None and run.parity_max < 1e-5
    assert math.isfinite(run.loss) and run.loss != losses[1]  # the last step's: step 4, not step 2


def test_validation_split_across_ranks_sums_to_the_whole(tiny_llama_dir):
    """Each of N ranks computes every N-th validation batch (as many forwards each: a rank short of
    a batch computes one it does not count); their summed (loss, tokens) is the loss over all."""
    from lora_dist.device import local_placement
    from lora_dist.train import build_local, evaluate, prepare_data, val_batches

    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}", *TINY_OVERRIDES,
                                "train.eval_batches=3"])
    built = build_local(spec, local_placement(spec))
    batches = val_batches(prepare_data(spec, built.tokenizer), spec)
    assert len(batches) == 3
    whole = evaluate(built.model, batches)
    for world in (2, 3, 4):
        stats, forwards = [], []
        hook = built.model.register_forward_hook(lambda *_: forwards.append(1))
        for rank in range(world):
            evaluate(built.model, batches, share=(rank, world), gather=lambda s: stats.append(s) or [s])
        hook.remove()
        total, count = torch.stack(stats).sum(0).tolist()
        assert total / count == pytest.approx(whole, rel=1e-9) and len(forwards) == world * -(-3 // world)


def test_a_local_output_dir_may_be_any_writable_directory(tiny_llama_dir, tmp_path):
    """`lora-dist train` (and the embedded submit, test_distributed) run as the user: output.dir
    outside the current directory is fine ('..' is still refused: test_spec)."""
    cwd = tmp_path / "here"
    cwd.mkdir()
    elsewhere = tmp_path / "scratch" / "runs"
    args = [f"--set=model.base={tiny_llama_dir}", f"--set=data.path={E2E_CSV}", f"--set=output.dir={elsewhere}",
            *[f"--set={o}" for o in TINY_OVERRIDES], "--set=train.max_steps=1"]
    proc = run_cli("train", str(MAIN_JOB), *args, cwd=cwd)
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    assert artifact.parent == elsewhere and store.verify_artifact(artifact).steps == 1


def test_env_var_values_never_reach_the_artifact_or_the_output(tiny_llama_dir, tmp_path):
    """runtime_env values are often secrets: the manifest keeps the names only."""
    out = tmp_path / "runs"
    args = [f"--set=model.base={tiny_llama_dir}", f"--set=data.path={E2E_CSV}", f"--set=output.dir={out}",
            *[f"--set={o}" for o in TINY_OVERRIDES], "--set=train.max_steps=1",
            "--set=cluster.runtime_env={env_vars: {MY_SERVICE_URL: s3cr3t-value}}"]
    # a name the cluster allows (a *TOKEN* name is refused outright: test_runtime_env); the
    # artifact comes out signed
    env = {**os.environ, store.SIGNING_KEY_ENV: "test-key", "LORA_DIST_ALLOW_ENV": "MY_SERVICE_*"}
    proc = run_cli("train", str(MAIN_JOB), *args, cwd=tmp_path, env=env)
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    manifest = store.verify_artifact(artifact)
    assert manifest.spec["cluster"]["runtime_env"]["env_vars"] == {"MY_SERVICE_URL": "<redacted>"}
    assert "s3cr3t" not in proc.stdout + proc.stderr
    assert not [f.name for f in artifact.iterdir() if b"s3cr3t" in f.read_bytes()]
    assert manifest.signature.startswith("hmac-sha256:")
    digest = store.manifest_digest(artifact)
    checked = run_cli("verify", str(artifact), f"--digest={digest}", cwd=tmp_path, env=env)
    assert f"manifest {digest} (signature checked)" in checked.stdout
    wrong = run_cli("verify", str(artifact), cwd=tmp_path, check=False, env={**env, store.SIGNING_KEY_ENV: "other"})
    assert wrong.returncode != 0 and "the signature does not match" in wrong.stderr


def test_early_stop_exports_the_adapter_of_the_best_validation(tiny_llama_dir, tmp_path):
    """Validated every step at a learning rate high enough for the validation loss to turn, the
    run stops 2 validations after its best, and the adapter it exports is the best one: loaded
    back, it scores the recorded best validation loss (within 1e-5), not the last one."""
    from lora_dist.adapter import load_adapted
    from lora_dist.train import Dataset, evaluate, prepare_data, train_local, val_batches

    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}", f"output.dir={tmp_path}",
                                *TINY_OVERRIDES, "train.max_steps=12", "train.eval_every=1",
                                "train.early_stop_patience=2", "train.lr=0.3"])
    log = io.StringIO()
    artifact = train_local(spec, job_id="early", stream=log)
    manifest = store.verify_artifact(artifact)
    vals = {m["step"]: m["val_loss"] for m in _metrics(artifact) if "val_loss" in m}
    best, stopped = manifest.best_step, manifest.stopped_at
    assert stopped is not None and stopped < 12 and manifest.steps == stopped, log.getvalue()
    assert [m["step"] for m in _metrics(artifact) if "loss" in m] == list(range(1, stopped + 1))
    assert best == min((s for s in vals if s >= 1), key=lambda s: vals[s]) and stopped - best == 2
    assert vals[best] < vals[stopped] and f"early stop at step {stopped}" in log.getvalue()

    loaded, _ = load_adapted(artifact)
    data = prepare_data(spec, loaded.tokenizer)
    batches = val_batches(Dataset(data.train, data.val, data.pad_id, 0, 0), spec)
    again = evaluate(loaded.model, batches)
    assert again == pytest.approx(manifest.best_val_loss, abs=1e-5)
    assert abs(again - vals[stopped]) > 1e-3


def test_early_stop_needs_validations_and_a_lora_run():
    from lora_dist.spec import SpecError

    with pytest.raises(SpecError, match=r"train\.early_stop_patience: counts validations; set train\.eval_every > 0"):
        load_spec(MAIN_JOB, [f"data.path={E2E_CSV}", "train.early_stop_patience=3"])
    with pytest.raises(SpecError, match="early stop is for train.method: lora"):
        load_spec(MAIN_JOB, [f"data.path={E2E_CSV}", "train.early_stop_patience=3", "train.eval_every=5",
                             "train.method=full", "model.quantization=none"])
    assert load_spec(REPO / "jobs" / "smollm2-e2e-quality.yaml", [f"data.path={E2E_CSV}"]).train.early_stop_patience


def test_bad_spec_exits_2_with_field_named(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("name: x\nlora: {r: 0}\n")
    proc = run_cli("train", str(job), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "lora.r: must be from 1 to 4096, got 0" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_data_file_is_reported_before_any_work(tmp_path):
    proc = run_cli("train", str(MAIN_JOB), "--set", "data.path=nope.csv", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "data.path: file not found" in proc.stderr


def test_full_finetuning_needs_a_float_base(tmp_path):
    proc = run_cli("train", str(MAIN_JOB), "--set=train.method=full", cwd=REPO, check=False)
    assert proc.returncode == 2 and "train.method: 'full' trains every weight" in proc.stderr


def test_full_finetuning_baseline_writes_a_loadable_model(tmp_path, tiny_llama_dir):
    """train.method: full (the baseline benchmarks compare against) trains every weight."""
    from transformers import AutoModelForCausalLM

    from lora_dist.adapter import load_adapted
    from lora_dist.train import train_local

    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}", f"output.dir={tmp_path}",
                                *TINY_OVERRIDES, "train.method=full", "model.quantization=none",
                                "train.max_steps=1", "train.lr=1e-2"])
    artifact = train_local(spec, stream=io.StringIO())
    loaded, manifest = load_adapted(artifact)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert manifest.kind == "full" and manifest.method == "full"
    assert manifest.trainable_params == sum(p.numel() for p in base.parameters())  # tied embedding once
    w_new = loaded.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w_new, base.model.layers[0].self_attn.q_proj.weight)
    ids = torch.tensor([[1, 2, 3]])
    assert loaded.model(input_ids=ids).logits.shape == (1, 3, base.config.vocab_size)


def test_bf16_compute_keeps_lora_in_fp32_and_records_the_dtypes(tmp_path, tiny_llama_dir):
    """train.dtype: bf16 in one process: the frozen float weights and activations in bf16,
    whatever config.json says; LoRA weights (and so AdamW state) in fp32; the manifest says so;
    the loss stays near the fp32 run's."""
    from lora_dist.device import local_placement
    from lora_dist.lora import is_lora_param
    from lora_dist.train import build_local, train_local

    common = [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}", *TINY_OVERRIDES, "train.max_steps=2"]
    spec = load_spec(MAIN_JOB, common + [f"output.dir={tmp_path}", "train.dtype=bf16"])
    built = build_local(spec, local_placement(spec))
    dtypes = {n: p.dtype for n, p in built.model.named_parameters()}
    assert {d for n, d in dtypes.items() if is_lora_param(n)} == {torch.float32}
    assert built.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {d for n, d in dtypes.items() if n.endswith("weight_absmax")} == {torch.float32}
    manifest = store.verify_artifact(train_local(spec, stream=io.StringIO()))
    assert manifest.precision["compute_dtype"] == "bf16" and manifest.precision["lora_master_dtype"] == "fp32"
    fp32 = store.verify_artifact(train_local(load_spec(MAIN_JOB, common + [f"output.dir={tmp_path / 'fp32'}"]),
                                             stream=io.StringIO()))
    assert fp32.precision["compute_dtype"] == "fp32"
    assert abs(manifest.final_loss - fp32.final_loss) < 0.05 * fp32.final_loss


def test_activation_checkpointing_gives_the_same_loss_and_lora_gradients(tiny_llama_dir):
    from lora_dist.lora import LoRALinear, trainable_parameters
    from lora_dist.model import enable_activation_checkpointing, load_model
    from lora_dist.spec import LoraSpec

    runs = []
    for ckpt in (False, True):
        m = load_model(str(tiny_llama_dir), LoraSpec(r=4, dropout=0.0), "int8", seed=1, with_tokenizer=False).model
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                torch.nn.init.normal_(mod.lora_B, generator=torch.Generator().manual_seed(2))
        if ckpt:
            enable_activation_checkpointing(m)
        m.train()
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.item(), [p.grad.clone() for p in trainable_parameters(m).values()]))
    assert abs(runs[0][0] - runs[1][0]) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[0][1], runs[1][1]))


# --- the real model, the real entry point ------------------------------------------------------------

@pytest.mark.slow
def test_short_run_lowers_validation_loss_and_writes_artifact(trained):
    artifact, proc = trained
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(artifact) and artifact.is_dir()
    assert any(line.startswith("step 1/12") and "tok/s" in line for line in lines)  # progress shown
    manifest = store.verify_artifact(artifact)
    print(f"validation loss {manifest.val_loss_before:.4f} -> {manifest.val_loss_after:.4f} in 12 steps")
    # Stated margin: 12 steps of r=8 LoRA on E2E lower held-out loss by at least 0.3 nats/token
    # (SmolLM2 starts near 2.46 on these validation batches; a measured run ended at 1.77).
    assert manifest.val_loss_after < manifest.val_loss_before - 0.3, manifest
    assert manifest.trainable_params == 2_442_240  # r=8 on the 7 linears of 30 blocks
    assert manifest.quantization == "int8" and manifest.world_size == 1 and manifest.zero_stage == 0
    assert manifest.steps == 12 and manifest.lora["targets"] == ["all-linear"]
    assert manifest.base_model.id == "smollm2-135m"
    assert manifest.base_model.fingerprint.startswith("sha256:")
    assert manifest.adapter_bytes == (artifact / store.ADAPTER_FILE).stat().st_size
    assert manifest.adapter_bytes < 2_442_240 * 4 + 64_000  # fp32 A and B plus the header
    assert {"torch", "transformers", "bitsandbytes"} <= set(manifest.versions)
    assert [m["step"] for m in _metrics(artifact) if "loss" in m] == list(range(1, 13))


@pytest.mark.slow
def test_generate_uses_the_adapter(trained, tmp_path):
    artifact, _ = trained
    proc = run_cli("generate", str(artifact), "--prompt", "name[The Eagle], eatType[coffee shop], area[riverside]",
                   "--max-new-tokens", "30", cwd=tmp_path)
    text = proc.stdout.strip().splitlines()[-1]
    assert "Eagle" in text, text


@pytest.mark.slow
def test_an_adapter_trained_on_jsonl_data_serves_eval_and_generate(tmp_path, tiny_llama_dir):
    """jobs/smollm2-jsonl.yaml's data (on the tiny Llama: this is about the data and the template,
    not the model): the artifact loads for generate and eval, prompted with the template recorded
    in its manifest (JSONL: the prompt as written)."""
    proc = run_cli("train", str(REPO / "jobs" / "smollm2-jsonl.yaml"), f"--set=output.dir={tmp_path / 'runs'}",
                   f"--set=model.base={tiny_llama_dir}", "--set=lora.targets=[q_proj,v_proj]",
                   "--set=train.max_steps=3", "--set=train.eval_batches=1", cwd=REPO)
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    manifest = store.verify_artifact(artifact)
    assert manifest.data.source == "jsonl" and manifest.data.prompt_template == "{input}"
    gen = run_cli("generate", str(artifact), "--prompt", "Translate to French: thank you",
                  "--max-new-tokens", "8", cwd=tmp_path)
    assert gen.stdout.strip(), gen.stderr
    ev = run_cli("eval", str(artifact), "--data", str(E2E_CSV), "--limit", "2", "--num-beams", "1",
                 "--max-new-tokens", "16", cwd=tmp_path)
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    assert metrics["mrs"] == 2 and metrics["BLEU"] >= 0


MODES = ("padded", "grouped", "packed")


@pytest.fixture(scope="module")
def per_mode(tmp_path_factory, tiny_llama_dir):
    """A 2-step job of each batching mode, 2 ZeRO-3 ranks (the worker's own code, gloo processes),
    each with the parity guard on against its single-process reference; name -> artifact."""
    from zero_run import job_config, run_ranks

    from lora_dist.spec import spec_from_dict
    from lora_dist.store import artifact_location
    from lora_dist.train import reference_losses

    out = tmp_path_factory.mktemp("modes") / "runs"
    jobs = []
    # each batching mode under the main job's ZeRO-3, and the default mode under zero_stage auto
    runs = {mode: (f"data.batching={mode}",) for mode in MODES} | {"auto": ("cluster.zero_stage=auto",)}
    for name, extra in runs.items():
        job = job_config(f"mode-{name}", tiny_llama_dir, ("q_proj", "v_proj"), out, 2, steps=2,
                         extra=(*extra, "train.parity_check=true", "train.parity_steps=2", "data.max_length=96"))
        job["parity_reference"] = reference_losses(spec_from_dict(job["spec"]), world_size=2, steps=2)
        jobs.append(job)
    run_ranks(jobs, 2)
    return {name: Path(artifact_location(str(out), f"mode-{name}", f"mode-{name}")) for name in runs}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_each_batching_mode_keeps_the_sharded_loss_on_the_unsharded_one(per_mode, mode):
    manifest = store.verify_artifact(per_mode[mode])
    assert manifest.spec["data"]["batching"] == mode
    print(f"{mode}: largest |sharded - unsharded| loss {manifest.parity_max_loss_diff:.2e}")
    assert manifest.parity_max_loss_diff is not None and manifest.parity_max_loss_diff < 1e-4
    steps = [m for m in _metrics(per_mode[mode]) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(m["tokens"] > 0 for m in steps)


@pytest.mark.slow
def test_zero_stage_auto_replicates_a_base_that_fits_and_keeps_the_loss(per_mode):
    """Two CPU workers, each with far more memory than the tiny base needs: auto runs ZeRO-1 (the
    base whole on each rank, no parameter gathers), says why in the manifest, and trains the
    same losses as the single-process reference."""
    manifest = store.verify_artifact(per_mode["auto"])
    assert manifest.zero_stage == 1, manifest.zero_stage_reason
    assert manifest.zero_stage_reason.startswith("auto: the base replicated on each of 2 worker(s)")
    assert manifest.int8_partition_bytes == manifest.int8_full_bytes  # replicated: the whole base per rank
    assert manifest.parity_max_loss_diff is not None and manifest.parity_max_loss_diff < 1e-4
    sharded = store.verify_artifact(per_mode["grouped"])
    assert sharded.zero_stage == 3 and sharded.zero_stage_reason == "cluster.zero_stage: 3 in the spec"
    assert sharded.int8_partition_bytes < sharded.int8_full_bytes


@pytest.mark.slow
def test_grouped_batches_pad_less_than_padded_ones(per_mode):
    def pad(mode: str) -> float:
        steps = [m for m in _metrics(per_mode[mode]) if "loss" in m]
        return sum(m["pad_tokens"] for m in steps) / sum(m["pad_tokens"] + m["tokens"] for m in steps)

    print(f"padding: padded {pad('padded'):.1%}, grouped {pad('grouped'):.1%}, packed {pad('packed'):.1%}")
    assert pad("grouped") < pad("padded")
