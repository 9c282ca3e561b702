"""lora-dist: LoRA fine-tuning of models too large for one accelerator.

A frozen int8 base sharded by DeepSpeed ZeRO-3 across Ray Train workers; only the LoRA
matrices A and B train. See README.md and docs/.

The Python SDK is :class:`lora_dist.Client` (``lora_dist/client.py``). It is imported on first
use, so that ``import lora_dist`` stays as light as the commands that only read a job's state.
"""

__version__ = "0.1.0"
__all__ = ["Client", "Job", "JobStatus"]


def __getattr__(name: str):
    if name in ("Client", "Job"):
        import importlib

        return getattr(importlib.import_module("lora_dist.client"), name)
    if name == "JobStatus":
        from lora_dist.jobs import JobStatus

        return JobStatus
    raise AttributeError(f"module 'lora_dist' has no attribute {name!r}")
