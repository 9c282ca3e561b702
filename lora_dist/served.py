"""What one serving replica does: hold a base once, load adapters on first use, and run a batch of
requests for different adapters as one decode (``multilora`` + ``decode``).

Kept free of Ray Serve and HTTP (``serving.py`` wraps it), so that the same object answers the
same request in a test, a benchmark or a replica.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dist.chat import render as render_chat
from lora_dist.data import prompt_ids
from lora_dist.decode import Completion, Row, decode
from lora_dist.errors import ArtifactError
from lora_dist.generate import chat_template_of, format_prompt, stop_ids, uses_bos
from lora_dist.model import load_model
from lora_dist.multilora import AdapterWeights, assign, read_adapter, wrap_linears
from lora_dist.records import Manifest
from lora_dist.sources import DataError
from lora_dist.store import cache_root, fetch, is_uri, manifest_digest, verify_artifact


class RequestError(Exception):
    """A request the model cannot run as asked (HTTP 400), with OpenAI's error code."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class AdapterRef:
    """Where a replica finds an adapter, and what it must be: the manifest digest the server
    verified at start (a changed artifact is refused) and the base fingerprint it trained on."""
    location: str
    digest: str


@dataclass
class LoadedAdapter:
    name: str
    manifest: Manifest
    weights: AdapterWeights
    load_seconds: float


def local_copy(location: str, digest: str | None) -> Path:
    """The adapter as a local directory: itself, or a verified copy of a storage URI in this
    machine's cache, one per manifest digest (``digest`` None: the digest the copy turns out to
    have, as ``serve`` first meets a URI)."""
    if not is_uri(location):
        return Path(location)
    cache = cache_root() / "serve"
    if digest is not None and (cache / digest).exists():
        return cache / digest
    cache.mkdir(parents=True, exist_ok=True)
    staging = cache / f".fetch-{os.getpid()}-{time.time_ns()}"
    fetch(location, staging, digest=digest)
    target = cache / manifest_digest(staging)
    if target.exists():  # another process fetched the same artifact first
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return target


class Replica:
    """One base model, held once (quantized as the adapters trained), and its adapters' table.

    Args:
        base: the base as the adapters' manifests name it (built-in id, hub id, or directory).
        quantization: ``int8`` or ``none``.
        adapters: name -> :class:`AdapterRef`.
        threads: torch threads for the decode.
    """

    def __init__(self, base: str, quantization: str, adapters: dict[str, AdapterRef], threads: int = 0) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.loaded = load_model(base, None, quantization)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.model.eval()
        self.layers = wrap_linears(self.model)
        self.adapters = adapters
        config = self.model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.lock = threading.Lock()
        self.batches: list[tuple[int, int]] = []  # each decoded batch's rows and distinct adapters (stats)

    def load(self, name: str) -> LoadedAdapter:
        """Verify and load an adapter (the multiplexed loader's work).

        Raises:
            ArtifactError: it fails verification, changed since the server started, or trained
                on another base.
        """
        t0 = time.time()
        ref = self.adapters[name]
        path = local_copy(ref.location, ref.digest)
        manifest = verify_artifact(path, digest=ref.digest)
        base = manifest.base_model
        if base is None or base.fingerprint != self.loaded.fingerprint:
            raise ArtifactError(f"adapter {name}: trained on a base with fingerprint "
                                f"{base.fingerprint if base else 'unrecorded'}; this replica's base has "
                                f"{self.loaded.fingerprint}")
        weights = read_adapter(path, manifest, self.layers)
        return LoadedAdapter(name, manifest, weights, time.time() - t0)

    def prepare(self, request: dict[str, Any], adapter: LoadedAdapter | None) -> Row:
        """A request (``serving`` has checked its fields) as a decode row, the prompt through the
        adapter's recorded template.

        Raises:
            RequestError: chat for an adapter not trained on chat; a prompt over the context.
        """
        tok, manifest = self.tokenizer, adapter.manifest if adapter is not None else None
        stops = set(stop_ids(manifest, tok) or []) if manifest is not None else set()
        if request["kind"] == "chat":
            template = chat_template_of(manifest) if manifest is not None else getattr(tok, "chat_template", None)
            if template is None:
                raise RequestError(f"model {request['model']} was not trained on chat data (it has no chat "
                                   f"template): use /v1/completions", code="model_not_chat", param="model")
            try:
                text = render_chat(tok, template, request["messages"], generation_prompt=True)
            except DataError as e:
                raise RequestError(f"messages: the model's chat template refused them: {e}", param="messages") from None
            ids, stops = prompt_ids(tok, text, False), stops or _chat_stops(tok)
        else:
            text = format_prompt(manifest, request["prompt"]) if manifest is not None else request["prompt"]
            ids = prompt_ids(tok, text, uses_bos(manifest) if manifest is not None else False)
        stops = stops or ({tok.eos_token_id} - {None})
        max_tokens = request["max_tokens"]
        if len(ids) + max_tokens > self.context:
            raise RequestError(f"This model's maximum context length is {self.context} tokens. However, you "
                               f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} "
                               f"in the completion). Please reduce the prompt or max_tokens.",
                               code="context_length_exceeded", param="prompt")
        return Row(ids, max_tokens, stops, request.get("temperature", 1.0), request.get("top_p", 1.0),
                   request.get("seed"), list(request.get("stop") or []))

    def run(self, rows: list[Row], adapters: list[LoadedAdapter | None]) -> list[Completion]:
        """Decode a batch: each row with its own adapter's LoRA term, the base once for all."""
        with self.lock:  # the layers hold one batch's assignment at a time
            assign(self.layers, [a.weights if a is not None else None for a in adapters])
            try:
                self.batches.append((len(rows), len({id(a) for a in adapters})))
                return decode(self.model, rows, self.pad_id,
                              lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
            finally:
                assign(self.layers, [])

    def stats(self) -> dict[str, Any]:
        """This replica's resident memory (bytes) and process id, for benchmarks and operators."""
        return {"pid": os.getpid(), "rss_bytes": _rss_bytes(), "fingerprint": self.loaded.fingerprint,
                "batches": len(self.batches), "largest_batch": max((n for n, _ in self.batches), default=0),
                "most_adapters_in_a_batch": max((k for _, k in self.batches), default=0)}


def _chat_stops(tok) -> set[int]:
    from lora_dist.chat import end_of_turn

    template = getattr(tok, "chat_template", None)
    return {end_of_turn(tok, template)} if template else set()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
