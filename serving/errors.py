"""Every error a client sees is OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.

Two places produce errors:
- the replica's FastAPI app (validation, limits, internal errors): `ApiError`, `install_error_handlers`
  and `catch_internal_errors`;
- Ray Serve's HTTP proxy, in front of every replica: when a replica dies mid-request (SIGKILL, OOM,
  node loss) the proxy gets `ActorDiedError`/`RayActorError`, sends nothing, and uvicorn answers a
  plain-text `500 Internal Server Error`; its own 404/408/429/503 answers are plain text too.
  `ProxyErrorMiddleware` wraps the proxy's ASGI app (Serve's documented hook: the env var
  `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.errors:proxy_middlewares` on every node, read
  when the proxy starts) and turns "no response" into a retryable 503 with `Retry-After`, and plain
  text error bodies into the same shape with the status and headers kept.

The proxy-side part imports only starlette and the standard library: it runs in Serve's proxy actor.
"""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger("raylm.serving")

REPLICA_LOST_RETRY_AFTER_S = 1
MAX_ECHO_CHARS = 80  # a value echoed in a message is clipped: a 1 MB model name is not repeated back


def clip(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """repr-like text of a client's value for an error message, at most `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates print safely
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_json(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    """A starlette JSONResponse in OpenAI's error shape."""
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class ApiError(Exception):
    """An error returned to the caller in OpenAI's error format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def internal_error_response(request_id: str | None = None):
    """The 500 a client gets for a bug: a fixed message (no exception text, which may hold PII), and
    `x-should-retry: false` so the OpenAI client does not repeat a request that fails the same way."""
    where = f" (request {request_id})" if request_id else ""
    return error_json(500, f"internal server error{where}; the server logged the cause", "server_error",
                      code="internal_error", headers={"x-should-retry": "false"})


def validation_message(errors: list[dict]) -> str:
    """One line naming every invalid field of a request body (pydantic/FastAPI error list)."""
    problems = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            msg = f"body is not valid JSON ({(e.get('ctx') or {}).get('error', 'parse error')})"
        problems.append(f"{loc}: {msg}")
    return "invalid request: " + "; ".join(problems)


def install_error_handlers(api) -> None:
    """OpenAI-shaped answers for ApiError, request validation and HTTP exceptions of a FastAPI app."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @api.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return error_json(exc.status, exc.message, exc.type, exc.param, exc.code)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        return error_json(422, validation_message(list(exc.errors())), "invalid_request_error", code="validation_error")

    @api.exception_handler(HTTPException)
    async def _http(_, exc: HTTPException):
        return error_json(exc.status_code, str(exc.detail), "invalid_request_error")


async def catch_internal_errors(app, scope, receive, send, *, describe) -> None:
    """Run an ASGI app; an exception escaping it becomes a 500 in OpenAI's shape (or, once the
    response has started, is logged and the response ended), never a plain-text 500 or a crash of
    the connection. `describe()` names the request in the log line."""
    started = {"response": False}

    async def tracking_send(message):
        if message["type"] == "http.response.start":
            started["response"] = True
        await send(message)

    try:
        await app(scope, receive, tracking_send)
    except Exception:
        logger.exception("request %s failed", describe())
        if not started["response"]:
            await internal_error_response()(scope, receive, send)


# ---- Serve's HTTP proxy ------------------------------------------------------------------------------
class ProxyErrorMiddleware:
    """ASGI middleware around Serve's HTTP proxy app (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):
            return await self.app(scope, receive, send)  # Serve's own /-/healthz and /-/routes
        state = {"started": False, "rewrite": None, "body": b""}

        async def rewriting_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                headers = [(k.lower(), v) for k, v in message.get("headers", [])]
                content_type = dict(headers).get(b"content-type", b"")
                if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                    state["rewrite"] = (message["status"], [(k, v) for k, v in headers
                                                            if k not in (b"content-type", b"content-length")])
                    return
            elif message["type"] == "http.response.body" and state["rewrite"] is not None:
                state["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                status, headers = state["rewrite"]
                text = state["body"].decode("utf-8", "replace").strip() or f"HTTP {status}"
                await _send_error(send, status, text, headers)
                return
            await send(message)

        try:
            await self.app(scope, receive, rewriting_send)
        except Exception:  # the proxy handles its own errors; this is a last line of defence
            logger.exception("Serve proxy raised")
        if not state["started"]:
            # The proxy sends nothing when the replica died or failed unexpectedly (ActorDiedError,
            # RayActorError, ...): uvicorn would answer a plain-text 500. Another replica (or the
            # replacement Serve starts) can answer the same request: say so.
            await _send_error(send, 503, "the replica handling this request stopped before answering; "
                              "retry the request", [(b"retry-after", str(REPLICA_LOST_RETRY_AFTER_S).encode()),
                                                    (b"x-should-retry", b"true")], code="replica_unavailable")


_TYPE_BY_STATUS = {404: "not_found_error", 408: "timeout_error", 429: "rate_limit_error"}


async def _send_error(send, status: int, message: str, headers: list, code: str | None = None) -> None:
    type_ = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.errors:proxy_middlewares`: Serve calls this
    once when its HTTP proxy starts and wraps the proxy's ASGI app with what it returns."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrorMiddleware)]
