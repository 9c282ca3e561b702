"""The int8 linear before and after it stopped keeping its input (issue 12, docs/design.md decision 9).

    python bench/int8_backward.py [--steps 3]

The old forward was ``bitsandbytes.matmul``. bitsandbytes 0.50 dispatches it by device: on CUDA
to ``MatMul8bitLt``, which keeps its input ``x`` on ``ctx.tensors`` (outside autograd's saved
tensors, so activation checkpointing cannot free it either); on CPU to ``MatMul8bitFp``, which
keeps only the weight. The new forward (``quant.Int8Matmul``) keeps references to the frozen
parameters only, on both.

On the main job's model (SmolLM2-135M, int8 base, LoRA r=8 on every linear, dropout 0.05) and its
first micro-batch (8 x 96 from the job's BatchPlan), side by side in one process:

* bytes kept for backward by one decoder block: what autograd saves (``saved_tensors_hooks``)
  plus, for the old CUDA path, each int8 linear's input that is not saved anyway (what
  ``MatMul8bitLt`` would hold; counted from the inputs, since this machine has no GPU);
* the same at GPT-3 width (d_model 12288, micro-batch 1 x 2048, bf16, activation checkpointing,
  docs/planning.md's GPT-3 setting), counted on the meta device: what the old CUDA path holds that
  the checkpointed new path does not, x 96 blocks;
* the loss and the LoRA gradients of the same batch through both forwards on CPU, and the losses
  of a few AdamW steps from the same initial weights: the two paths must agree to 1e-6.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import bitsandbytes as bnb
from bitsandbytes.autograd._functions import MatmulLtState
from lora_dist.device import local_placement
from lora_dist.counting import SavedBytes, meta_forward
from lora_dist.model import decoder_blocks
from lora_dist.quant import Int8Linear
from lora_dist.spec import load_spec
from lora_dist.train import LocalRunner, build_local, global_index, micro_batch, prepare_data, seed_batch
from lora_dist.data import BatchPlan

REPO = Path(__file__).resolve().parents[1]
NEW_FORWARD = Int8Linear.forward


def old_forward(self, x):
    """Int8Linear.forward as it was: bitsandbytes' matmul, which keeps x for backward."""
    state = MatmulLtState()
    state.CB, state.SCB = self.weight, self.weight_absmax
    state.has_fp16_weights, state.is_training = False, True
    return bnb.matmul(x, self.weight, state=state, bias=None if self.bias is None else self.bias.to(x.dtype))


def block_kept_bytes(model, batch, backward: bool = True) -> tuple[int, int]:
    """(bytes autograd saves while the first decoder block runs its forward, the same plus every
    int8 linear input of that block not saved anyway: what MatMul8bitLt keeps on CUDA)."""
    _, blocks = decoder_blocks(model)
    counter = SavedBytes(model)
    inputs: dict[int, int] = {}
    active = [False]

    def pack(t):
        return counter.pack(t) if active[0] else t

    def record(mod, args):
        if active[0]:
            x = args[0]
            inputs[x.untyped_storage()._cdata] = x.numel() * x.element_size()

    hooks = [blocks[0].register_forward_pre_hook(lambda *_: active.__setitem__(0, True)),
             blocks[0].register_forward_hook(lambda *_: active.__setitem__(0, False))]
    hooks += [m.register_forward_pre_hook(record) for m in blocks[0].modules() if isinstance(m, Int8Linear)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        if backward:
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    extra = sum(size for key, size in inputs.items() if key not in counter.sizes)
    return counter.total, counter.total + extra


def gpt3_width_kept() -> tuple[int, int]:
    """At GPT-3 width, micro-batch 1 x 2048, bf16, activation checkpointing: (what one block keeps
    for backward with the new linear: its checkpointed input, what the old CUDA path keeps on top:
    the block's distinct int8 linear inputs), counted on the meta device."""
    from lora_dist.base import base_config
    from lora_dist.model import build_skeleton, enable_activation_checkpointing
    from lora_dist.spec import LoraSpec

    config = base_config("gpt3-175b")
    config.num_hidden_layers = 1
    model, _ = build_skeleton(config, LoraSpec(r=4, alpha=4, dropout=0.0, targets=("c_attn",)), "int8",
                              dtype=torch.bfloat16, meta_buffers=True)
    enable_activation_checkpointing(model)
    model.train()
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    with meta_forward("cuda"):
        saved, with_inputs = block_kept_bytes(model, {"input_ids": ids, "labels": ids, "use_cache": False},
                                              backward=False)
    block_input = 2048 * 12288 * 2  # what a checkpointed block keeps
    return block_input, with_inputs - saved


def run(model, spec, data, plan, steps, seed) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(loss of each step, LoRA gradients of the first step) with plain AdamW."""
    runner = LocalRunner(model, spec, 1)
    losses, grads = [], {}
    model.train()
    for step in range(1, steps + 1):
        index = global_index(step, 0, 0, 1, 1)
        seed_batch(seed, index)
        loss = model(**micro_batch(data, plan, index)).loss
        runner.backward(loss)
        if step == 1:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        runner.step()
        losses.append(float(loss))
    return losses, grads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = load_spec(REPO / "jobs" / "smollm2-e2e.yaml", [f"data.path={REPO / 'jobs/data/e2e/devset.csv'}"])
    t0 = time.time()
    built = build_local(spec, local_placement(spec))
    data = prepare_data(spec, built.tokenizer)
    plan = BatchPlan(len(data.train), spec.train.micro_batch_size, spec.train.seed)
    batch = micro_batch(data, plan, 0)
    print(f"main job model built in {time.time() - t0:.1f} s; micro-batch {tuple(batch['input_ids'].shape)}")
    initial = copy.deepcopy(built.model.state_dict())

    results = {}
    for name, forward in (("old (bitsandbytes matmul)", old_forward), ("new (Int8Matmul)", NEW_FORWARD)):
        Int8Linear.forward = forward
        built.model.load_state_dict(initial)
        built.model.train()
        seed_batch(spec.train.seed, 0)
        saved = block_kept_bytes(built.model, batch)
        built.model.load_state_dict(initial)
        t = time.time()
        losses, grads = run(built.model, spec, data, plan, args.steps, spec.train.seed)
        results[name] = (saved, losses, grads, time.time() - t)
    Int8Linear.forward = NEW_FORWARD

    (old_name, old), (new_name, new) = results.items()
    def line(label: str, n: int, blocks: int) -> str:
        return f"  {label:<52} {n:>14,} bytes ({n / 2**20:8.1f} MiB; x {blocks} blocks = {blocks * n / 2**30:.2f} GiB)"

    print(f"\nkept for backward by one decoder block of the main job, micro-batch {tuple(batch['input_ids'].shape)}, "
          f"fp32:")
    print(line("old, CPU (MatMul8bitFp: the weight only)", old[0][0], 30))
    print(line("old, CUDA (MatMul8bitLt: + each linear's input)", old[0][1], 30))
    print(line("new, CPU and CUDA (Int8Matmul: nothing of x)", new[0][0], 30))
    print(f"  new saves {old[0][1] - new[0][0]:,} bytes per block against the old CUDA path "
          f"({100 * (old[0][1] - new[0][0]) / old[0][1]:.0f}%); on CPU the two keep the same")
    ckpt, old_ckpt = gpt3_width_kept()
    print("\nGPT-3 width (d_model 12288), micro-batch 1 x 2048, bf16, activation checkpointing, LoRA on Wq, Wv "
          "(counted on meta):")
    print(line("new: the checkpointed block input", ckpt, 96))
    print(line("old CUDA path: + the int8 linears' inputs on ctx", ckpt + old_ckpt, 96))
    print(f"  the old path held {96 * old_ckpt / 1e9:.1f} GB per GPU more for these 96 blocks")
    diffs = [abs(a - b) for a, b in zip(old[1], new[1])]
    gdiff = max(float((old[2][k] - new[2][k]).abs().max()) for k in old[2])
    print(f"\nlosses, {args.steps} AdamW steps from the same weights:")
    print(f"  old {['%.7f' % x for x in old[1]]}  ({old[3]:.1f} s)")
    print(f"  new {['%.7f' % x for x in new[1]]}  ({new[3]:.1f} s)")
    print(f"  largest loss difference {max(diffs):.2e}; largest LoRA gradient difference at step 1 {gdiff:.2e}")
    print(f"  same to 1e-6: {'yes' if max(diffs) <= 1e-6 else 'NO'}")


if __name__ == "__main__":
    main()
