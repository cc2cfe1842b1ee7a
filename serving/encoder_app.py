"""Serve deployment for classification (/v1/classify) and NER (/v1/ner) exports (import path stays
`serving.app:build`, which picks this server for encoder tasks)."""

import asyncio
import time
import uuid
from typing import Callable

from fastapi import FastAPI
from ray import serve

from serving.base import DEPLOYMENT_DEFAULTS, ERROR_RESPONSES, ModelServer
from serving.errors import ApiError
from serving.observers import RequestRecord, ResponseRecord, notify
from serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    EntitySpan,
    ModelCard,
    ModelList,
    NerResponse,
    NerResult,
    Usage,
)


@serve.deployment(name="EncoderServer", **DEPLOYMENT_DEFAULTS)
@serve.ingress()
class EncoderServer(ModelServer):
    """Classification (/v1/classify) or NER (/v1/ner) export, batched across concurrent requests."""

    def __init__(self, raw_args: dict):
        self._setup(raw_args)
        from serving.encoders import EncoderEngine

        self.engine = EncoderEngine(
            self.export, quantize_int8=self.args.quantize_int8, device=self.args.device, dtype=self.args.dtype,
            trust_remote_code=self.args.trust_remote_code,
        )
        # A doubled NER export reads a text twice in max_seq_len: its texts may take half of it.
        self.max_prompt_tokens = self.args.max_prompt_tokens or self.engine.max_text_tokens
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

    def _checked_counts(self, texts: list[str]) -> list[int]:
        counts = [self.engine.count_tokens(t) for t in texts]
        if max(counts) > self.max_prompt_tokens:
            raise ApiError(400, f"input has {max(counts)} tokens, over the limit of {self.max_prompt_tokens} "
                           "(max_prompt_tokens)", param="input", code="prompt_too_long")
        return counts

    def _admit_texts(self, texts: list[str]) -> tuple[list[str], list[int]]:
        """Admission thread: token limit on the texts as sent, then PII masking of texts that passed."""
        counts = self._checked_counts(texts)
        if not self.args.pii_masking:
            return texts, counts
        masked = [self._mask(t) for t in texts]
        return masked, self._checked_counts(masked)

    async def _admit(self, request: ClassifyRequest, route: str) -> tuple[list[str], int, str]:
        self._check_model(request.model)
        texts = request.texts
        if not texts:
            raise ApiError(400, "input is empty", param="input")
        if len(texts) > self.args.max_inputs_per_request:
            raise ApiError(400, f"{len(texts)} texts exceed the limit of {self.args.max_inputs_per_request} per request "
                           "(max_inputs_per_request)", param="input")
        texts, counts = await self.run_admission(self._admit_texts, texts, size=sum(map(len, texts)))
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
            texts, tokens, request_id = await self._admit(request, "/v1/classify")
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
            """Entities with character offsets [start, end) into each input text (token-classification exports).
            With pii_masking on, offsets refer to the masked text, which `text` of each entity is cut from."""
            if task != "token-classification":
                raise ApiError(404, f"this app serves a {task} export; use /v1/classify", code="wrong_task")
            started = time.perf_counter()
            texts, tokens, request_id = await self._admit(request, "/v1/ner")
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
