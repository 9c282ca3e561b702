"""``lora-dist serve``: many adapters over one base, OpenAI-compatible HTTP, on Ray Serve.

    client ──HTTP──► Gateway (FastAPI ingress: bearer token, request checks, OpenAI JSON)
                        │ handle.options(multiplexed_model_id=adapter)
                        ▼
                     BaseServer, one deployment per base (and quantization)
                        ├─ the base, held once per replica (int8 as trained)
                        ├─ @serve.multiplexed: adapters verified and loaded on first use, LRU
                        └─ @serve.batch: concurrent requests, any adapters, one decode (served.Replica)

The gateway holds the table of models (the bases and every adapter the server verified at start)
and the bearer token's sha256 only: the token itself is in no deployment argument, Ray's
application config or log.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request) at
# run time, and Serve's ingress cannot resolve them as strings.
import asyncio
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from lora_dist.served import AdapterRef, LoadedAdapter, Replica, RequestError

MAX_STOP = 4
MAX_BODY = 8 << 20  # bytes: a request is a prompt, not a corpus

api = FastAPI(title="lora-dist serve", docs_url=None, redoc_url=None, openapi_url=None)


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          param: str | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


@api.exception_handler(404)
async def _not_found(request: Request, exc) -> JSONResponse:
    return error(404, f"no route {request.method} {request.url.path}: the API is /v1/models, /v1/completions and "
                      f"/v1/chat/completions", code="not_found")


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{key}: must be {kind} from {lo:g} to {hi:.10g}, got {value!r}", param=key)
    return value


def parse_request(body: Any, kind: str) -> dict[str, Any]:
    """The fields a request may carry, checked; anything else an OpenAI client sends is ignored.

    Raises:
        RequestError: naming the field and the form expected.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model: required, a model id from GET /v1/models", param="model")
    req: dict[str, Any] = {"model": model, "kind": kind}
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages: required, a non-empty list of {role, content}", param="messages")
        req["messages"] = [_message(m, i) for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt: required, a string (one prompt per request)", param="prompt")
        req["prompt"] = prompt
    if body.get("stream"):
        raise RequestError("stream: streaming is not supported; the whole completion comes in one response",
                           param="stream")
    if body.get("n", 1) != 1:
        raise RequestError("n: only 1 completion per request is supported", param="n")
    req["max_tokens"] = _number(body, "max_tokens", 16 if kind == "completion" else 256, 1, 1 << 20, integer=True)
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        req["max_tokens"] = _number(body, "max_completion_tokens", 256, 1, 1 << 20, integer=True)
    req["temperature"] = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    req["top_p"] = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if req["top_p"] == 0.0:
        raise RequestError("top_p: must be above 0", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
        raise RequestError(f"seed: must be a non-negative integer, got {seed!r}", param="seed")
    req["seed"] = seed
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"stop: a string or a list of at most {MAX_STOP} non-empty strings", param="stop")
    req["stop"] = stop or []
    return req


def _message(m: Any, i: int) -> dict[str, str]:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
        raise RequestError(f"messages[{i}]: an object with role system, user or assistant and its content",
                           param="messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"messages[{i}].content: only text parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content: must be a string", param="messages")
    return {"role": "system" if m["role"] == "developer" else m["role"], "content": content}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _response(req: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["tokens"],
             "total_tokens": out["prompt_tokens"] + out["tokens"]}
    created = int(time.time())
    if req["kind"] == "chat":
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": req["model"], "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": out["finish_reason"], "logprobs": None}]}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created, "model": req["model"],
            "usage": usage, "choices": [{"index": 0, "text": out["text"], "logprobs": None,
                                         "finish_reason": out["finish_reason"]}]}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class Gateway:
    """The HTTP front: bearer token, request checks, routing by model name, OpenAI responses.

    Args:
        bases: base name -> its BaseServer handle.
        models: model name -> {"base", "adapter" (None for the base itself), "chat", "created"}.
        refused: adapter name -> why it is not served.
        token_sha256: the bearer token's sha256; None serves without a token (127.0.0.1 only).
    """

    def __init__(self, bases: dict, models: dict[str, dict], refused: dict[str, str], token_sha256: str | None):
        self.bases, self.models, self.refused, self.token = bases, models, refused, token_sha256

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if self.token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), self.token):
            return error(401, "missing or wrong bearer token: send Authorization: Bearer <the server's token>",
                         kind="authentication_error", code="invalid_api_key")
        return None

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        if (denied := self._unauthorized(request)) is not None:
            return denied
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": m["created"], "owned_by": "lora-dist",
             "root": m["base"], "parent": m["base"] if m["adapter"] else None, "chat": m["chat"]}
            for name, m in self.models.items()]}

    @api.get("/lora-dist/stats")
    async def stats(self, request: Request):
        """Each base's replica: process id, resident memory, adapters loaded and their load times."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        return {name: await handle.stats.remote() for name, handle in self.bases.items()}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, "completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, "chat")

    async def _serve(self, request: Request, kind: str):
        if (denied := self._unauthorized(request)) is not None:
            return denied
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return error(413, f"the request body is {len(raw)} bytes; at most {MAX_BODY}", code="request_too_large")
        try:
            body = json.loads(raw)
        except ValueError:
            return error(400, "the request body is not valid JSON", code="invalid_json")
        try:
            req = parse_request(body, kind)
        except RequestError as e:
            return error(400, str(e), code=e.code, param=e.param)
        model = self.models.get(req["model"])
        if model is None:
            why = self.refused.get(req["model"])
            message = (f"the model `{req['model']}` is not served: {why}" if why else
                       f"the model `{req['model']}` does not exist; GET /v1/models lists {len(self.models)}")
            return error(404, message, code="model_not_found", param="model")
        if kind == "chat" and not model["chat"]:
            return error(400, f"model {req['model']} was not trained on chat data: use /v1/completions",
                         code="model_not_chat", param="model")
        handle = self.bases[model["base"]]
        if model["adapter"]:
            handle = handle.options(multiplexed_model_id=model["adapter"])
        try:
            out = await handle.complete.remote({**req, "adapter": model["adapter"]})
        except Exception as e:  # the replica failed (its log has the traceback); the client gets why, in one line
            return error(500, f"the model server failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                         kind="server_error", code="server_error")
        if "error" in out:
            return error(out["status"], out["error"], code=out.get("code"), param=out.get("param"),
                         kind="invalid_request_error" if out["status"] < 500 else "server_error")
        return _response(req, out)


def _batch_across_adapters() -> None:
    """Let this request join a batch with requests for other adapters.

    Ray Serve's ``serve.batch`` splits a batch by the requests' ``multiplexed_model_id`` (2.60:
    ``_BatchQueue._split_batch_by_model_id``) and runs the parts as separate batches, which would
    undo the heterogeneous batching (and run them at once over the same layers). The id has
    routed the request to a replica holding its adapter and the loader has run; it is cleared in
    this request's own context before the batched call, so one batch holds every adapter.
    ``test_serve.py::test_serve_two_adapters_through_the_openai_client`` checks it.
    """
    import dataclasses

    from ray.serve import context

    current = context._get_serve_request_context()
    context._serve_request_context.set(dataclasses.replace(current, multiplexed_model_id=""))


def base_server(max_adapters: int, max_batch_size: int, cpus: float):
    """The BaseServer deployment class with this server's limits (Ray Serve takes them at decoration)."""

    @serve.deployment(ray_actor_options={"num_cpus": cpus}, max_ongoing_requests=max(64, 4 * max_batch_size))
    class BaseServer:
        def __init__(self, base: str, quantization: str, adapters: dict[str, dict], threads: int) -> None:
            self.replica = Replica(base, quantization, {n: AdapterRef(**a) for n, a in adapters.items()}, threads)
            self.loads: dict[str, float] = {}

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, name: str) -> LoadedAdapter:
            loaded = await asyncio.get_running_loop().run_in_executor(None, self.replica.load, name)
            self.loads[name] = loaded.load_seconds
            return loaded

        async def complete(self, req: dict[str, Any]) -> dict[str, Any]:
            from lora_dist.errors import ArtifactError, SettingError

            try:
                adapter = await self.adapter(req["adapter"]) if req["adapter"] else None
            except (ArtifactError, SettingError) as e:  # SettingError: this replica's signing key is unusable
                return {"error": f"adapter {req['adapter']} refused: {e}", "status": 409, "code": "adapter_refused"}
            try:
                row = self.replica.prepare(req, adapter)
            except RequestError as e:
                return {"error": str(e), "status": 400, "code": e.code, "param": e.param}
            _batch_across_adapters()
            done = await self._batch((row, adapter))
            return {"text": done.text, "tokens": done.tokens, "finish_reason": done.finish_reason,
                    "prompt_tokens": len(row.prompt)}

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.02)
        async def _batch(self, items: list[tuple]) -> list:
            rows, adapters = [i[0] for i in items], [i[1] for i in items]
            return await asyncio.get_running_loop().run_in_executor(None, self.replica.run, rows, adapters)

        def stats(self) -> dict[str, Any]:
            return {**self.replica.stats(), "adapter_load_seconds": dict(self.loads)}

    return BaseServer


def build_app(config: dict[str, Any]):
    """The application from a JSON-able config (what ``serve deploy`` on a cluster imports):

    ``{"bases": {name: {"base", "quantization", "adapters": {adapter: {"location", "digest"}}}},
    "models": ..., "refused": ..., "token_sha256": ..., "max_adapters", "max_batch_size", "cpus"}``
    """
    server = base_server(config["max_adapters"], config["max_batch_size"], config["cpus"])
    handles = {name: server.options(name=f"base-{i}").bind(b["base"], b["quantization"], b["adapters"],
                                                             int(config["cpus"]))
               for i, (name, b) in enumerate(sorted(config["bases"].items()))}
    return Gateway.bind(handles, config["models"], config["refused"], config["token_sha256"])


def remote_app(args: dict[str, Any]):
    """The application builder a cluster's Serve imports (``lora_dist.serving:remote_app``)."""
    return build_app(args)
