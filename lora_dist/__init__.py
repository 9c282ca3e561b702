"""lora-dist: LoRA fine-tuning of models too large for one accelerator.

A frozen int8 base sharded by DeepSpeed ZeRO-3 across Ray Train workers; only the LoRA
matrices A and B train. See README.md and docs/.
"""

__version__ = "0.1.0"
