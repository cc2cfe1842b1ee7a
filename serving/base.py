"""What every raylm replica has, whatever it serves: the guard middleware (API key, body size, metrics,
internal errors), args, export, model thread, PII masking, health endpoint and error handlers."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.args import ServingArgs
from serving.errors import ApiError, catch_internal_errors, error_json, install_error_handlers
from serving.export_format import read_export
from serving.observers import load_observers
from serving.schemas import ErrorResponse, HealthResponse
from serving.security import ApiKeyGuard, install_pii_log_filter, mask_pii

logger = logging.getLogger("raylm.serving")

KNOWN_ROUTES = {
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/classify", "/v1/ner",
    "/healthz", "/openapi.json", "/docs",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 500, 503)
}

# Inputs up to this many characters are tokenized on the event loop (well under a millisecond);
# longer ones, and any that PII masking scans, on the admission threads.
INLINE_ADMISSION_CHARS = 4096

# Shared by both servers; the Serve config YAML overrides any of these per deployment.
DEPLOYMENT_DEFAULTS = dict(
    max_ongoing_requests=64,
    graceful_shutdown_wait_loop_s=1.0,
    graceful_shutdown_timeout_s=60.0,
    health_check_period_s=10.0,
    health_check_timeout_s=30.0,
)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from the body reader; an HTTPException so FastAPI passes it through body parsing."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes (max_body_bytes)")


class GuardMiddleware:
    """ASGI middleware in front of every route: API key (401/403), body size (413), the
    requests-by-route-and-status metric, and a 500 in OpenAI's shape for any exception that escapes
    a route. Runs before FastAPI parses the body, so an unauthenticated or oversized request never
    reaches validation or the model."""

    def __init__(self, app, *, server: "ModelServer"):
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

            async def guarded(scope, receive, send):
                rejection = self._reject(scope, path)
                if rejection is not None:
                    await rejection(scope, receive, send)
                    return
                try:
                    await self.app(scope, receive, send)
                except _BodyTooLarge:
                    await self._too_large()(scope, receive, send)

            await catch_internal_errors(guarded, scope, receive_limited, send_tracking,
                                        describe=lambda: f"{scope.get('method')} {path}")
        finally:
            try:
                metrics = self.server.metrics
                metrics.requests.inc(tags={"route": route, "status": str(status["code"])})
                metrics.request_latency.observe(time.perf_counter() - started, tags={"route": route})
            except Exception:  # a metrics failure never turns an answered request into an error
                logger.exception("recording request metrics failed")

    def _reject(self, scope, path: str):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        guard = self.server.guard
        if guard is not None and path not in self.server.args.open_paths:
            failure = guard.check(headers.get("authorization"))
            if failure is not None:
                return error_json(
                    failure.status, failure.message, "authentication_error" if failure.status == 401 else "permission_error",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"} if failure.status == 401 else None,
                )
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.server.args.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self):
        limit = self.server.args.max_body_bytes
        return error_json(413, f"request body exceeds the limit of {limit} bytes (max_body_bytes)",
                          "invalid_request_error", code="body_too_large")


class ModelServer:
    """What every raylm replica has: args, export, API keys, metrics, observers, one model thread."""

    engine: Any

    def _setup(self, raw_args: dict) -> None:
        self.args = ServingArgs.model_validate(raw_args)
        self.export = read_export(self.args.export_dir)
        self.model_name = self.args.served_model_name or self.export.manifest.model_name
        self.guard = ApiKeyGuard.from_sources(self.args.api_keys_env, self.args.api_keys_file, self.args.require_api_key)
        if self.args.pii_masking:
            install_pii_log_filter(logger)
        self.observers = load_observers(self.args.observers)
        from serving.metrics import ServingMetrics

        self.metrics = ServingMetrics()
        # Every model call runs on this one thread: torch's inference mode and thread settings are
        # per-thread, and the event loop stays free to accept, batch and stream requests.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="raylm-model", initializer=self._init_model_thread)
        # Admission work that grows with the input (tokenizing, PII masking) runs here, off the event
        # loop and off the model thread: a 1 MB body delays neither other requests nor decoding.
        self._admission = ThreadPoolExecutor(2, thread_name_prefix="raylm-admit")
        self._init_model_thread()
        self.created = int(time.time())

    def _init_model_thread(self) -> None:
        if self.args.torch_threads:
            import torch

            torch.set_num_threads(self.args.torch_threads)

    async def run_model(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    async def run_admission(self, fn: Callable, *args, size: int):
        """Admission work on `size` characters of input: on the event loop when small and unmasked
        (tokenizing a short prompt costs less than the hop to a thread and back, measured in
        benchmarks/serve_overhead.py), else on the admission threads."""
        if size <= INLINE_ADMISSION_CHARS and not self.args.pii_masking:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._admission, fn, *args)

    async def check_health(self) -> None:
        """Serve's periodic health check: fails when the model cannot answer one forward pass in time."""
        await asyncio.wait_for(self.run_model(self.engine.check_health), timeout=self.args.health_check_timeout_s)

    def _mask(self, text: str) -> str:
        return mask_pii(text) if self.args.pii_masking else text

    def _mask_output(self, text: str) -> str:
        return mask_pii(text) if self.args.pii_mask_output else text

    def _check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            from serving.errors import clip

            raise ApiError(404, f"model {clip(requested)} is not served here; use '{self.model_name}'",
                           param="model", code="model_not_found")

    def _new_api(self, title: str) -> FastAPI:
        api = FastAPI(title=title, version="1", description=f"raylm serving for export '{self.model_name}'")
        api.add_middleware(GuardMiddleware, server=self)
        install_error_handlers(api)

        @api.get("/healthz", response_model=HealthResponse, responses=ERROR_RESPONSES)
        async def healthz():
            """Open (no key). 200 when the model answers a one-token forward pass, else 503."""
            try:
                await self.check_health()
            except Exception:
                # The cause goes to the replica log (masked when pii_masking is on), never to the
                # unauthenticated caller: exception text can hold paths, inputs or internals.
                logger.exception("health check failed")
                return error_json(503, "model cannot answer; see the replica log", "server_error", code="unhealthy")
            return HealthResponse(status="ok", model=self.model_name)

        return api
