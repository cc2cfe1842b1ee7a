"""Ray Serve application for an exported model: `serving.app:build` is the Serve config import path.

    serve run serving/configs/causal_lm_cpu.yaml           # or: serve deploy <config>

A causal-LM export gets OpenAI-compatible /v1/completions, /v1/chat/completions (streaming as
server-sent events) and /v1/models, with LoRA adapters served as model id `<model>:<adapter>`; a
classification export gets /v1/classify and an NER export /v1/ner. Every app has /healthz and
/openapi.json. Requests are batched with @serve.batch, adapters multiplexed with serve.multiplexed.
"""

from cluster.requirements_check import check_requirements

# Replicas import this first: a node whose Python lacks raylm's dependencies fails with one line naming them.
check_requirements("serving.app", run_as_main=False)

import asyncio
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.deployment import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.args import ServingArgs
from serving.export_format import ExportFormatError, list_adapters, read_export
from serving.observers import RequestRecord, ResponseRecord, load_observers, notify
from serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EntitySpan,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    NerResponse,
    NerResult,
    Usage,
)
from serving.security import ApiKeyGuard, PiiMaskingFilter, mask_pii

logger = logging.getLogger("raylm.serving")

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KNOWN_ROUTES = {
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/classify", "/v1/ner",
    "/healthz", "/openapi.json", "/docs",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 503)
}


class ApiError(Exception):
    """An error returned to the caller in OpenAI's error format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from the body reader; an HTTPException so FastAPI passes it through body parsing."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes (max_body_bytes)")


class GuardMiddleware:
    """ASGI middleware in front of every route: API key (401/403), body size (413), and the
    requests-by-route-and-status metric. Runs before FastAPI parses the body, so an unauthenticated
    or oversized request never reaches validation or the model."""

    def __init__(self, app, *, server: "_ModelServer"):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        route = path if path in KNOWN_ROUTES else "other"
        status = {"code": 500}

        async def send_tracking(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            rejection = self._reject(scope, path)
            if rejection is not None:
                await rejection(scope, receive, send_tracking)
                return
            limit = self.server.args.max_body_bytes
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise _BodyTooLarge(limit)
                return message

            try:
                await self.app(scope, receive_limited, send_tracking)
            except _BodyTooLarge:
                await self._too_large()(scope, receive, send_tracking)
        finally:
            metrics = self.server.metrics
            metrics.requests.inc(tags={"route": route, "status": str(status["code"])})
            metrics.request_latency.observe(time.perf_counter() - started, tags={"route": route})

    def _reject(self, scope, path: str):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        guard = self.server.guard
        if guard is not None and path not in self.server.args.open_paths:
            failure = guard.check(headers.get("authorization"))
            if failure is not None:
                return error_response(
                    failure.status, failure.message, "authentication_error" if failure.status == 401 else "permission_error",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"} if failure.status == 401 else None,
                )
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.server.args.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self):
        limit = self.server.args.max_body_bytes
        return error_response(413, f"request body exceeds the limit of {limit} bytes (max_body_bytes)",
                              "invalid_request_error", code="body_too_large")


class _ModelServer:
    """What every raylm replica has: args, export, API keys, metrics, observers, one model thread."""

    engine: Any

    def _setup(self, raw_args: dict) -> None:
        self.args = ServingArgs.model_validate(raw_args)
        self.export = read_export(self.args.export_dir)
        self.model_name = self.args.served_model_name or self.export.manifest.model_name
        self.guard = ApiKeyGuard.from_sources(self.args.api_keys_env, self.args.api_keys_file, self.args.require_api_key)
        if self.args.pii_masking:
            logger.addFilter(PiiMaskingFilter())
        self.observers = load_observers(self.args.observers)
        from serving.metrics import ServingMetrics

        self.metrics = ServingMetrics()
        # Every model call runs on this one thread: torch's inference mode and thread settings are
        # per-thread, and the event loop stays free to accept, batch and stream requests.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="raylm-model", initializer=self._init_model_thread)
        self._init_model_thread()
        self.created = int(time.time())

    def _init_model_thread(self) -> None:
        if self.args.torch_threads:
            import torch

            torch.set_num_threads(self.args.torch_threads)

    async def run_model(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    async def check_health(self) -> None:
        """Serve's periodic health check: fails when the model cannot answer one forward pass in time."""
        await asyncio.wait_for(self.run_model(self.engine.check_health), timeout=self.args.health_check_timeout_s)

    def _mask(self, text: str) -> str:
        return mask_pii(text) if self.args.pii_masking else text

    def _check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise ApiError(404, f"model '{requested}' is not served here; use '{self.model_name}'",
                           param="model", code="model_not_found")

    def _new_api(self, title: str) -> FastAPI:
        api = FastAPI(title=title, version="1", description=f"raylm serving for export '{self.model_name}'")
        api.add_middleware(GuardMiddleware, server=self)

        @api.exception_handler(ApiError)
        async def _api_error(_: Request, exc: ApiError):
            return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

        @api.exception_handler(RequestValidationError)
        async def _invalid(_: Request, exc: RequestValidationError):
            problems = [
                f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
            ]
            return error_response(422, "invalid request: " + "; ".join(problems), "invalid_request_error",
                                  code="validation_error")

        @api.exception_handler(StarletteHTTPException)
        async def _http(_: Request, exc: StarletteHTTPException):
            return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

        @api.get("/healthz", response_model=HealthResponse, responses=ERROR_RESPONSES)
        async def healthz():
            """Open (no key). 200 when the model answers a one-token forward pass, else 503."""
            try:
                await self.check_health()
            except Exception as exc:
                return error_response(503, f"model cannot answer: {exc!r}", "server_error", code="unhealthy")
            return HealthResponse(status="ok", model=self.model_name)

        return api


# Shared by both servers; the Serve config YAML overrides any of these per deployment.
_DEPLOYMENT_DEFAULTS = dict(
    max_ongoing_requests=64,
    graceful_shutdown_wait_loop_s=1.0,
    graceful_shutdown_timeout_s=60.0,
    health_check_period_s=10.0,
    health_check_timeout_s=30.0,
)


@serve.deployment(name="CausalLMServer", **_DEPLOYMENT_DEFAULTS)
@serve.ingress()
class CausalLMServer(_ModelServer):
    """Causal-LM export behind OpenAI-compatible endpoints, batched decoding, multiplexed LoRA adapters."""

    def __init__(self, raw_args: dict):
        self._setup(raw_args)
        from serving.generation import CausalLMEngine

        self.engine = CausalLMEngine(
            self.export,
            adapters_dir=self.args.adapters_dir,
            quantize_int8=self.args.quantize_int8,
            device=self.args.device,
            dtype=self.args.dtype,
            trust_remote_code=self.args.trust_remote_code,
            chat_template=self.args.chat_template,
        )
        self.max_prompt_tokens = self.args.max_prompt_tokens or self.engine.max_seq_len
        self._decode_batch.set_max_batch_size(self.args.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

        engine, run_model = self.engine, self.run_model

        async def load_adapter(name: str):
            return await run_model(engine.load_adapter, name)

        # Wrapped here, not at class level, so the LRU size comes from the app args.
        self._load_adapter = serve.multiplexed(max_num_models_per_replica=self.args.max_adapters_per_replica)(load_adapter)

    # ---- batching --------------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _decode_batch(self, jobs: list) -> AsyncIterator[list]:
        """One decode loop for all concurrent requests; yields one token event per request per step."""
        begin = time.perf_counter()
        self.metrics.batch_size.observe(len(jobs), tags={"kind": "generate"})
        for job in jobs:
            self.metrics.queue_wait.observe(begin - job.enqueued_at, tags={"kind": "generate"})
        batch = await self.run_model(self.engine.start_batch, jobs)
        try:
            events = await self.run_model(batch.step)  # the first token alone: time to first token
            yield [StopIteration if event is None else event for event in events]
            while not batch.done:
                events = await self.run_model(batch.run, self.args.stream_interval_s)
                yield [StopIteration if event is None else event for event in events]
        finally:
            batch.close()

    async def _token_events(self, job) -> AsyncIterator:
        """A request's token events, with time-to-first-token and inter-token latency recorded."""
        arrived, previous = job.enqueued_at, None
        tags = {"model": self.model_name}
        async for event in self._decode_batch(job):
            now = time.perf_counter()
            if previous is None:
                self.metrics.time_to_first_token.observe(now - arrived, tags=tags)
            else:
                # An event may merge several steps: each of its tokens took an equal share.
                self.metrics.inter_token_latency.observe((now - previous) / len(event.token_ids), tags=tags)
            previous = now
            if event.generated:
                self.metrics.generated_tokens.inc(event.generated, tags=tags)
            yield event

    # ---- request preparation ---------------------------------------------------------------------
    def _resolve_adapter(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        base, sep, adapter = model.partition(":")
        if not sep or base != self.model_name:
            raise ApiError(404, f"model '{model}' is not served here; use '{self.model_name}' or "
                           f"'{self.model_name}:<adapter>' (GET /v1/models lists them)", param="model", code="model_not_found")
        if not ADAPTER_NAME.match(adapter) or adapter not in list_adapters(self.args.adapters_dir):
            raise ApiError(404, f"adapter '{adapter}' not found in the adapters directory; available: "
                           f"{list_adapters(self.args.adapters_dir)}", param="model", code="model_not_found")
        return adapter

    def _prepare(self, request, prompts: list[str]):
        from serving.generation import GenerationJob, SamplingParams

        max_tokens = request.max_tokens or self.args.default_max_tokens
        if max_tokens > self.args.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} exceeds the limit of {self.args.max_tokens_limit} "
                           "(max_tokens_limit)", param="max_tokens", code="max_tokens_exceeded")
        if len(prompts) > self.args.max_inputs_per_request:
            raise ApiError(400, f"{len(prompts)} prompts exceed the limit of {self.args.max_inputs_per_request} "
                           "per request (max_inputs_per_request)", param="prompt")
        adapter = self._resolve_adapter(request.model)
        params = SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                stop=request.stop_strings, seed=request.seed)
        jobs = []
        for prompt in prompts:
            ids = self.engine.encode(self._mask(prompt))
            if not ids:
                raise ApiError(400, "prompt is empty", param="prompt")
            if len(ids) > self.max_prompt_tokens:
                raise ApiError(400, f"prompt has {len(ids)} tokens, over the limit of {self.max_prompt_tokens} "
                               "(max_prompt_tokens)", param="prompt", code="prompt_too_long")
            if len(ids) + max_tokens > self.engine.max_seq_len:
                raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                               f"context of {self.engine.max_seq_len} tokens", param="max_tokens", code="context_length_exceeded")
            jobs.append(GenerationJob(ids, params, adapter))
        self.metrics.prompt_tokens.inc(sum(len(j.prompt_ids) for j in jobs), tags={"model": self.model_name})
        return jobs, adapter

    async def _run(self, route: str, model: str, prompts: list[str], request, respond, stream_chunk):
        """Shared path of completions and chat: admit, pin the adapter, then respond or stream."""
        started = time.perf_counter()
        jobs, adapter = self._prepare(request, prompts)
        if adapter:
            try:
                await self._load_adapter(adapter)
            except (ExportFormatError, FileNotFoundError, ValueError) as exc:
                raise ApiError(404, f"adapter '{adapter}' cannot be loaded: {exc}", param="model", code="model_not_found")
            self.engine.pin_adapter(adapter)
        request_id = f"{'chatcmpl' if route.endswith('chat/completions') else 'cmpl'}-{uuid.uuid4().hex}"
        notify(self.observers, "on_request", RequestRecord(request_id, route, model, [self._mask(p) for p in prompts]))

        def finished(texts: list[str], completion_tokens: int, status: int = 200):
            if adapter:
                self.engine.unpin_adapter(adapter)
            notify(self.observers, "on_response", ResponseRecord(
                request_id, route, model, status, [self._mask(t) for t in texts],
                sum(len(j.prompt_ids) for j in jobs), completion_tokens, time.perf_counter() - started))

        if not request.stream:
            try:
                results = await asyncio.gather(*(self._collect(job) for job in jobs))
            except BaseException:
                finished([], 0, 500)
                raise
            finished([r[0] for r in results], sum(r[2] for r in results))
            usage = Usage(prompt_tokens=sum(len(j.prompt_ids) for j in jobs),
                          completion_tokens=sum(r[2] for r in results),
                          total_tokens=sum(len(j.prompt_ids) for j in jobs) + sum(r[2] for r in results))
            return respond(request_id, results, usage)
        if len(jobs) != 1:
            finished([], 0, 400)
            raise ApiError(400, "stream: true takes a single prompt", param="prompt")
        return StreamingResponse(self._sse(jobs[0], request_id, request, stream_chunk, finished),
                                 media_type="text/event-stream")

    async def _collect(self, job) -> tuple[str, str, int]:
        text, reason, tokens = [], None, 0
        async for event in self._token_events(job):
            text.append(event.text_delta)
            reason = event.finish_reason or reason
            tokens += event.generated
        return "".join(text), reason, tokens

    async def _sse(self, job, request_id: str, request, stream_chunk, finished) -> AsyncIterator[str]:
        text, tokens, status = [], 0, 200
        try:
            first = stream_chunk(request_id, None, None, first=True)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for event in self._token_events(job):
                text.append(event.text_delta)
                tokens += event.generated
                if event.text_delta or event.finish_reason:
                    yield f"data: {json.dumps(stream_chunk(request_id, event.text_delta, event.finish_reason))}\n\n"
            if (request.stream_options or {}).get("include_usage"):
                usage = Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=tokens,
                              total_tokens=len(job.prompt_ids) + tokens)
                final = stream_chunk(request_id, None, None)
                final["choices"], final["usage"] = [], usage.model_dump()
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as exc:
            status = 500
            logger.exception("stream %s failed", request_id)
            yield f"data: {json.dumps({'error': {'message': repr(exc), 'type': 'server_error'}})}\n\n"
        finally:
            finished(["".join(text)], tokens, status)

    # ---- routes ----------------------------------------------------------------------------------
    def __serve_build_asgi_app__(self) -> FastAPI:
        api = self._new_api("raylm causal-LM serving")
        created = self.created

        @api.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
        async def models() -> ModelList:
            """The base model and every complete adapter in the adapters directory right now."""
            cards = [ModelCard(id=self.model_name, created=created)]
            cards += [ModelCard(id=f"{self.model_name}:{name}", created=created, root=self.model_name)
                      for name in list_adapters(self.args.adapters_dir)]
            return ModelList(data=cards)

        @api.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
        async def completions(request: CompletionRequest):
            """OpenAI-compatible text completion; `stream: true` sends server-sent events."""

            def respond(request_id, results, usage):
                return CompletionResponse(
                    id=request_id, created=int(time.time()), model=request.model, usage=usage,
                    choices=[CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r, _) in enumerate(results)],
                )

            def chunk(request_id, delta, finish_reason, first=False):
                if first:
                    return None
                return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": request.model,
                        "choices": [{"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}]}

            return await self._run("/v1/completions", request.model, request.prompts, request, respond, chunk)

        @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
        async def chat_completions(request: ChatCompletionRequest):
            """OpenAI-compatible chat; the export's chat template, or ChatML when it has none."""
            messages = [{"role": m.role, "content": self._mask(m.content)} for m in request.messages]
            prompt = self.engine.render_chat(messages)

            def respond(request_id, results, usage):
                text, reason, _ = results[0]
                return ChatCompletionResponse(
                    id=request_id, created=int(time.time()), model=request.model, usage=usage,
                    choices=[ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=reason)],
                )

            def chunk(request_id, delta, finish_reason, first=False):
                body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": request.model, "choices": []}
                if first:
                    body["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
                elif delta is not None or finish_reason is not None:
                    body["choices"] = [{"index": 0, "delta": {"content": delta} if delta else {},
                                        "finish_reason": finish_reason}]
                return body

            return await self._run("/v1/chat/completions", request.model, [prompt], request, respond, chunk)

        return api


@serve.deployment(name="EncoderServer", **_DEPLOYMENT_DEFAULTS)
@serve.ingress()
class EncoderServer(_ModelServer):
    """Classification (/v1/classify) or NER (/v1/ner) export, batched across concurrent requests."""

    def __init__(self, raw_args: dict):
        self._setup(raw_args)
        from serving.encoders import EncoderEngine

        self.engine = EncoderEngine(
            self.export, quantize_int8=self.args.quantize_int8, device=self.args.device, dtype=self.args.dtype,
            trust_remote_code=self.args.trust_remote_code,
        )
        self.max_prompt_tokens = self.args.max_prompt_tokens or self.engine.max_seq_len
        for batched in (self._classify_batch, self._ner_batch):
            batched.set_max_batch_size(self.args.max_batch_size)
            batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    async def _batched(self, kind: str, items: list[tuple[str, float]], fn: Callable) -> list:
        begin = time.perf_counter()
        self.metrics.batch_size.observe(len(items), tags={"kind": kind})
        for _, enqueued in items:
            self.metrics.queue_wait.observe(begin - enqueued, tags={"kind": kind})
        return await self.run_model(fn, [text for text, _ in items])

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, items: list[tuple[str, float]]) -> list:
        return await self._batched("classify", items, self.engine.classify)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _ner_batch(self, items: list[tuple[str, float]]) -> list:
        return await self._batched("ner", items, self.engine.ner)

    def _admit(self, request: ClassifyRequest, route: str) -> tuple[list[str], int, str]:
        self._check_model(request.model)
        texts = [self._mask(t) for t in request.texts]
        if not texts:
            raise ApiError(400, "input is empty", param="input")
        if len(texts) > self.args.max_inputs_per_request:
            raise ApiError(400, f"{len(texts)} texts exceed the limit of {self.args.max_inputs_per_request} per request "
                           "(max_inputs_per_request)", param="input")
        counts = [self.engine.count_tokens(t) for t in texts]
        if max(counts) > self.max_prompt_tokens:
            raise ApiError(400, f"input has {max(counts)} tokens, over the limit of {self.max_prompt_tokens} "
                           "(max_prompt_tokens)", param="input", code="prompt_too_long")
        self.metrics.prompt_tokens.inc(sum(counts), tags={"model": self.model_name})
        request_id = f"{route.rsplit('/', 1)[-1]}-{uuid.uuid4().hex}"
        notify(self.observers, "on_request", RequestRecord(request_id, route, self.model_name, texts))
        return texts, sum(counts), request_id

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = self._new_api(f"raylm {self.export.task} serving")
        task = self.export.task

        @api.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
        async def models() -> ModelList:
            return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

        @api.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
        async def classify(request: ClassifyRequest) -> ClassifyResponse:
            """Label and per-label probabilities for each input text (sequence-classification exports)."""
            if task != "sequence-classification":
                raise ApiError(404, f"this app serves a {task} export; use /v1/ner", code="wrong_task")
            started = time.perf_counter()
            texts, tokens, request_id = self._admit(request, "/v1/classify")
            now = time.perf_counter()
            probabilities = await asyncio.gather(*(self._classify_batch((t, now)) for t in texts))
            results = [ClassifyResult(label=max(p, key=p.get), score=max(p.values()), probabilities=p) for p in probabilities]
            notify(self.observers, "on_response", ResponseRecord(
                request_id, "/v1/classify", self.model_name, 200, [r.label for r in results], tokens, 0,
                time.perf_counter() - started))
            return ClassifyResponse(model=self.model_name, results=results,
                                    usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

        @api.post("/v1/ner", response_model=NerResponse, responses=ERROR_RESPONSES)
        async def ner(request: ClassifyRequest) -> NerResponse:
            """Entities with character offsets [start, end) into each input text (token-classification exports)."""
            if task != "token-classification":
                raise ApiError(404, f"this app serves a {task} export; use /v1/classify", code="wrong_task")
            started = time.perf_counter()
            texts, tokens, request_id = self._admit(request, "/v1/ner")
            now = time.perf_counter()
            spans = await asyncio.gather(*(self._ner_batch((t, now)) for t in texts))
            results = [NerResult(entities=[EntitySpan(**vars(e)) for e in entities]) for entities in spans]
            notify(self.observers, "on_response", ResponseRecord(
                request_id, "/v1/ner", self.model_name, 200,
                [" ".join(f"{e.entity}:{e.text}" for e in r.entities) for r in results], tokens, 0,
                time.perf_counter() - started))
            return NerResponse(model=self.model_name, results=results,
                               usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

        return api


def build(args: ServingArgs) -> Application:
    """Serve application builder (`import_path: serving.app:build`).

    Validates the args and the export directory on the caller's side first, so a wrong path or a
    broken export fails `serve run`/`serve deploy` with a message naming the file, not a replica crash.
    """
    if not isinstance(args, ServingArgs):
        args = ServingArgs.model_validate(args)
    export = read_export(args.export_dir)
    server = CausalLMServer if export.task == "causal-lm" else EncoderServer
    return server.bind(args.model_dump())
