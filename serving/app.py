"""Ray Serve application for an exported model: `serving.app:build` is the Serve config import path.

    serve run serving/configs/causal_lm_cpu.yaml           # or: serve deploy <config>

A causal-LM export gets OpenAI-compatible /v1/completions, /v1/chat/completions (streaming as
server-sent events) and /v1/models, with LoRA adapters served as model id `<model>:<adapter>`; a
classification export gets /v1/classify and an NER export /v1/ner (serving/encoder_app.py). Every
app has /healthz and /openapi.json. Generation is continuously batched (serving/scheduler.py), adapters
multiplexed with serve.multiplexed. Every error is OpenAI's error shape (serving/errors.py).
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
from typing import AsyncIterator

from fastapi import FastAPI
from ray import serve
from ray.serve.deployment import Application

from serving.args import ServingArgs
from serving.base import DEPLOYMENT_DEFAULTS, ERROR_RESPONSES, ModelServer
from serving.encoder_app import EncoderServer
from serving.errors import ApiError, clip
from serving.export_format import ExportFormatError, adapter_problems, list_adapters, read_adapter, read_export
from serving.observers import RequestRecord, ResponseRecord, notify
from serving.security import StreamMasker
from serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)

logger = logging.getLogger("raylm.serving")

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Content-part types that carry something other than text: refused with a 400 (this server reads text).
NON_TEXT_PARTS = {"image_url", "input_image", "image", "input_audio", "audio", "file", "video", "video_url"}
# A stream's generated tokens go to the raylm_generated_tokens counter at most this often (and when it ends).
GENERATED_TOKENS_EVERY_S = 1.0

__all__ = ["CausalLMServer", "EncoderServer", "build"]


def message_text(index: int, message: ChatMessage) -> str:
    """A message's text: the string, or its text parts joined with newlines; non-text parts are a 400."""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        where = f"messages.{index}.content.{j}"
        if part.type in NON_TEXT_PARTS:
            raise ApiError(400, f"{where}: content of type '{part.type}' is not supported; this model reads text "
                           "only (send {'type': 'text', 'text': ...} parts or a string)", param=where,
                           code="unsupported_content")
        if part.type != "text":
            raise ApiError(400, f"{where}: unknown content part type {clip(part.type)}; use 'text'", param=where)
        if part.text is None or (part.model_extra or {}):
            raise ApiError(400, f"{where}: a text part is {{'type': 'text', 'text': <string>}} and nothing else",
                           param=where)
        texts.append(part.text)
    return "\n".join(texts)


@serve.deployment(name="CausalLMServer", **DEPLOYMENT_DEFAULTS)
@serve.ingress()
class CausalLMServer(ModelServer):
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
        from serving.scheduler import Scheduler

        # Continuous batching: this thread owns the model; requests join the running batch at the next
        # decode step and leave when they finish (serving/scheduler.py).
        self.scheduler = Scheduler(
            self.engine,
            max_batch_size=self.args.max_batch_size,
            batch_wait_timeout_s=self.args.batch_wait_timeout_s,
            join_wait_s=self.args.join_wait_s,
            stream_interval_s=self.args.stream_interval_s,
            init_thread=self._init_model_thread,
            on_step=self._record_step,
        )

        engine, run_model = self.engine, self.run_model

        async def load_adapter(name: str):
            return await run_model(engine.load_adapter, name)

        # Wrapped here, not at class level, so the LRU size comes from the app args.
        self._load_adapter = serve.multiplexed(max_num_models_per_replica=self.args.max_adapters_per_replica)(load_adapter)

    async def run_model(self, fn, *args):
        """Model calls (adapter loads, health checks) run on the scheduler's thread between decode steps."""
        return await asyncio.wrap_future(self.scheduler.call(fn, *args))

    def _record_step(self, kind: str, size: int, queue_waits: list[float]) -> None:
        """Per model forward: rows in it (kind "generate": a decode step, "prefill": requests joining)."""
        self.metrics.batch_size.observe(size, tags={"kind": kind})
        for wait in queue_waits:
            self.metrics.queue_wait.observe(wait, tags={"kind": "generate"})

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop(timeout_s=5)

    async def _token_events(self, job) -> AsyncIterator:
        """A request's token events, with time-to-first-token and inter-token latency recorded per event, and
        generated tokens counted at most once per GENERATED_TOKENS_EVERY_S and when the request ends (Ray pushes
        metrics every few seconds anyway; a counter call per token was a share of the event loop's time)."""
        arrived, previous = job.enqueued_at, None
        metrics, tags = self.metrics, {"model": self.model_name}
        uncounted, counted_at = 0, arrived
        try:
            async for event in self.scheduler.events(job):
                now = time.perf_counter()
                if previous is None:
                    metrics.time_to_first_token.observe(now - arrived, tags=tags)
                else:
                    # An event may merge several steps: each of its tokens took an equal share.
                    metrics.inter_token_latency.observe((now - previous) / len(event.token_ids), tags=tags)
                previous = now
                uncounted += event.generated
                if uncounted and now - counted_at >= GENERATED_TOKENS_EVERY_S:
                    metrics.generated_tokens.inc(uncounted, tags=tags)
                    uncounted, counted_at = 0, now
                yield event
        finally:
            if uncounted:
                metrics.generated_tokens.inc(uncounted, tags=tags)

    # ---- request preparation ---------------------------------------------------------------------
    def _resolve_adapter(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        base, sep, adapter = model.partition(":")
        if not sep or base != self.model_name:
            raise ApiError(404, f"model {clip(model)} is not served here; use '{self.model_name}' or "
                           f"'{self.model_name}:<adapter>' (GET /v1/models lists them)", param="model", code="model_not_found")
        available = list_adapters(self.args.adapters_dir)
        if not ADAPTER_NAME.match(adapter) or adapter not in available:
            raise ApiError(404, f"adapter {clip(adapter)} not found in the adapters directory; available: "
                           f"{available}", param="model", code="model_not_found")
        try:
            problems = adapter_problems(read_adapter(self.engine.adapters_dir / adapter), self.export)
        except ExportFormatError as exc:
            raise ApiError(400, f"adapter '{adapter}' cannot be served: {exc}", param="model",
                           code="adapter_invalid") from None
        if problems:
            raise ApiError(400, f"adapter '{adapter}' cannot be served with model '{self.model_name}': "
                           + "; ".join(problems), param="model", code="adapter_incompatible")
        return adapter

    def _limits(self, request, count: int) -> int:
        max_tokens = request.max_tokens or self.args.default_max_tokens
        if max_tokens > self.args.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} exceeds the limit of {self.args.max_tokens_limit} "
                           "(max_tokens_limit)", param="max_tokens", code="max_tokens_exceeded")
        if count > self.args.max_inputs_per_request:
            raise ApiError(400, f"{count} prompts exceed the limit of {self.args.max_inputs_per_request} "
                           "per request (max_inputs_per_request)", param="prompt")
        return max_tokens

    def _checked_ids(self, text: str, max_tokens: int, param: str) -> list[int]:
        ids = self.engine.encode(text)
        if not ids:
            raise ApiError(400, f"{param} is empty", param=param)
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(400, f"{param} has {len(ids)} tokens, over the limit of {self.max_prompt_tokens} "
                           "(max_prompt_tokens)", param=param, code="prompt_too_long")
        if len(ids) + max_tokens > self.engine.max_seq_len:
            raise ApiError(400, f"{param} ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                           f"context of {self.engine.max_seq_len} tokens", param="max_tokens", code="context_length_exceeded")
        return ids

    def _admit_prompts(self, prompts: list[str], max_tokens: int) -> tuple[list[str], list[list[int]]]:
        """Admission thread: length limits on the text as sent, then PII masking (only of prompts that
        passed), then the token ids the model will see (masking may change their number)."""
        checked = [self._checked_ids(prompt, max_tokens, "prompt") for prompt in prompts]
        if not self.args.pii_masking:
            return prompts, checked  # unmasked: the ids just checked are the ones the model sees
        masked = [self._mask(p) for p in prompts]
        return masked, [self._checked_ids(p, max_tokens, "prompt") for p in masked]

    def _admit_chat(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[list[str], list[list[int]]]:
        prompt = self._render(messages)
        ids = self._checked_ids(prompt, max_tokens, "messages")
        if not self.args.pii_masking:
            return [prompt], [ids]
        prompt = self._render([{**m, "content": self._mask(m["content"])} for m in messages])
        return [prompt], [self._checked_ids(prompt, max_tokens, "messages")]

    def _render(self, messages: list[dict[str, str]]) -> str:
        from jinja2 import TemplateError

        try:
            return self.engine.render_chat(messages)
        except TemplateError as exc:
            raise ApiError(400, f"the chat template cannot render these messages: {clip(str(exc), 300)}",
                           param="messages", code="chat_template_error") from None

    async def _run(self, route: str, model: str, prompts: list[str], ids: list[list[int]], request, respond,
                   stream_chunk):
        """Shared path of completions and chat: pin the adapter, then respond or stream."""
        from serving.generation import GenerationJob, SamplingParams

        started = time.perf_counter()
        max_tokens = request.max_tokens or self.args.default_max_tokens
        adapter = self._resolve_adapter(request.model)
        params = SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                stop=request.stop_strings, seed=request.seed)
        jobs = [GenerationJob(prompt_ids, params, adapter) for prompt_ids in ids]
        if request.stream and len(jobs) != 1:
            raise ApiError(400, "stream: true takes a single prompt", param="prompt")
        self.metrics.prompt_tokens.inc(sum(len(j.prompt_ids) for j in jobs), tags={"model": self.model_name})
        if adapter:
            try:
                # Loaded and batched under its version key: a same-named adapter renamed into place since the
                # last load (a promotion) is loaded anew instead of answering with the old weights.
                adapter = self.engine.adapter_key(adapter)
                await self._load_adapter(adapter)
            except (ExportFormatError, FileNotFoundError, ValueError) as exc:
                raise ApiError(400, f"adapter '{adapter.partition('@')[0]}' cannot be loaded: {exc}", param="model",
                               code="adapter_invalid") from None
            self.engine.pin_adapter(adapter)
            for job in jobs:
                job.adapter = adapter
        request_id = f"{'chatcmpl' if route.endswith('chat/completions') else 'cmpl'}-{uuid.uuid4().hex}"
        notify(self.observers, "on_request", RequestRecord(request_id, route, model, list(prompts)))

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
            results = [(self._mask_output(text), reason, tokens) for text, reason, tokens in results]
            usage = Usage(prompt_tokens=sum(len(j.prompt_ids) for j in jobs),
                          completion_tokens=sum(r[2] for r in results),
                          total_tokens=sum(len(j.prompt_ids) for j in jobs) + sum(r[2] for r in results))
            return respond(request_id, results, usage)
        from fastapi.responses import StreamingResponse

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
        masker = StreamMasker() if self.args.pii_mask_output else None
        # The chunk with finish_reason, the usage chunk and [DONE] leave in one write (same bytes, same moment):
        # each write is a trip through every ASGI send wrapper and a socket write on the event loop.
        ending = ""
        try:
            first = stream_chunk(request_id, None, None, first=True)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for event in self._token_events(job):
                text.append(event.text_delta)
                tokens += event.generated
                delta = event.text_delta
                if masker is not None:
                    delta = masker.feed(delta, last=event.finish_reason is not None)
                if delta or event.finish_reason:
                    chunk = f"data: {json.dumps(stream_chunk(request_id, delta, event.finish_reason))}\n\n"
                    if event.finish_reason is None:
                        yield chunk
                    else:
                        ending = chunk
            if request.stream_options is not None and request.stream_options.include_usage:
                usage = Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=tokens,
                              total_tokens=len(job.prompt_ids) + tokens)
                final = stream_chunk(request_id, None, None)
                final["choices"], final["usage"] = [], usage.model_dump()
                ending += f"data: {json.dumps(final)}\n\n"
            yield ending + "data: [DONE]\n\n"
        except Exception:
            status = 500
            logger.exception("stream %s failed", request_id)
            error = {"message": f"internal server error (request {request_id}); the server logged the cause",
                     "type": "server_error", "param": None, "code": "internal_error"}
            yield f"{ending}data: {json.dumps({'error': error})}\n\n"
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
            max_tokens = self._limits(request, len(request.prompts))
            self._resolve_adapter(request.model)
            prompts, ids = await self.run_admission(self._admit_prompts, request.prompts, max_tokens,
                                                    size=sum(map(len, request.prompts)))

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

            return await self._run("/v1/completions", request.model, prompts, ids, request, respond, chunk)

        @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
        async def chat_completions(request: ChatCompletionRequest):
            """OpenAI-compatible chat; the export's chat template, or ChatML when it has none. Content may be
            a string or a list of text parts (joined with newlines); image, audio and file parts are a 400."""
            max_tokens = self._limits(request, 1)
            self._resolve_adapter(request.model)
            messages = [{"role": m.role, "content": message_text(i, m)} for i, m in enumerate(request.messages)]
            prompts, ids = await self.run_admission(self._admit_chat, messages, max_tokens,
                                                    size=sum(len(m["content"]) for m in messages))

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

            return await self._run("/v1/chat/completions", request.model, prompts, ids, request, respond, chunk)

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
