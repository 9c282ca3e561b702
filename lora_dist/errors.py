"""The exception types the CLI maps to exit codes, in a module that imports nothing heavy.

``lora-dist status``, ``list`` and ``logs`` must not import torch just to name the errors they
catch. Spec and data errors live with their modules (``spec.SpecError``, ``data.DataError``),
which import nothing heavy either.
"""

from __future__ import annotations


class ModelError(ValueError):
    """The base model cannot be resolved or does not fit the LoRA settings."""


class ArtifactError(ValueError):
    """An artifact is incomplete, tampered with, or does not match its base model."""


class JobFailed(RuntimeError):
    """The training job failed (after any retries); the message says why."""


class JobError(RuntimeError):
    """A job or artifact location cannot be found, reached or acted on; the message says which and why."""


class SettingError(ValueError):
    """A lora-dist setting in the environment (``$LORA_DIST_SIGNING_KEY``, ...) is unusable; the
    message names it. Bad input (exit 2), as a bad spec is."""


class NoArtifact(ArtifactError):
    """A job has not published an artifact (yet): it is running, failed or was stopped."""
