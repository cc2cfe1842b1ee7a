"""Hook point for request/response observers (audit logs, feedback capture, online evaluation).

An observer is any class with `on_request(RequestRecord)` and `on_response(ResponseRecord)` methods
and a no-argument constructor. List its import path in the app args:

    args:
      observers: ["mycompany.audit:AuditObserver"]

Each replica builds its own instances. Observers are called on the replica's event loop right after
a request is admitted (authenticated, validated) and after its response is complete (streams: after
the last token), so keep them fast or hand work to a queue. When `pii_masking` is on, prompts and
outputs in the records are already masked. An observer that raises is logged and skipped; it never
fails the request.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

logger = logging.getLogger("raylm.serving")


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    route: str
    model: str
    inputs: list[str]  # prompts, rendered chat prompts, or texts to classify


@dataclass(frozen=True)
class ResponseRecord:
    request_id: str
    route: str
    model: str
    status: int
    outputs: list[str] = field(default_factory=list)  # generated texts, labels, or entity summaries
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0


@runtime_checkable
class RequestObserver(Protocol):
    def on_request(self, record: RequestRecord) -> None: ...

    def on_response(self, record: ResponseRecord) -> None: ...


class LoggingObserver:
    """Logs one line per request and response to the `raylm.serving` logger (the replica log)."""

    def on_request(self, record: RequestRecord) -> None:
        logger.info("request %s %s model=%s inputs=%r", record.request_id, record.route, record.model, record.inputs)

    def on_response(self, record: ResponseRecord) -> None:
        logger.info(
            "response %s %s status=%d tokens=%d+%d latency=%.3fs outputs=%r",
            record.request_id, record.route, record.status, record.prompt_tokens,
            record.completion_tokens, record.latency_s, record.outputs,
        )


def load_observers(import_paths: list[str]) -> list[RequestObserver]:
    """Instantiate observers from 'module:Class' paths; a wrong path fails replica start with its name."""
    observers = []
    for path in import_paths:
        module_name, _, class_name = path.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"observers: cannot import '{path}' ({exc}); check the module path and class name") from exc
        observer = cls()
        if not isinstance(observer, RequestObserver):
            raise ValueError(f"observers: '{path}' has no on_request/on_response methods")
        observers.append(observer)
    return observers


def notify(observers: list[RequestObserver], method: str, record) -> None:
    """Call one hook on every observer; failures are logged, never raised."""
    for observer in observers:
        try:
            getattr(observer, method)(record)
        except Exception:  # an observer must never break serving
            logger.exception("observer %s.%s failed", type(observer).__name__, method)


class JsonlAuditObserver:
    """Appends every request and response record as one JSON line to the file named by the
    RAYLM_AUDIT_LOG env var (default ./raylm-audit.jsonl). With pii_masking on, records are masked."""

    def __init__(self):
        import os
        import threading

        self.path = os.environ.get("RAYLM_AUDIT_LOG", "raylm-audit.jsonl")
        self._lock = threading.Lock()

    def _write(self, kind: str, record) -> None:
        import dataclasses
        import json

        line = json.dumps({"kind": kind, **dataclasses.asdict(record)}, ensure_ascii=False)
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")

    def on_request(self, record: RequestRecord) -> None:
        self._write("request", record)

    def on_response(self, record: ResponseRecord) -> None:
        self._write("response", record)
