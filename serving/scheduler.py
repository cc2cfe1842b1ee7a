"""Continuous (iteration-level) batching: one scheduler thread per replica owns the model.

Requests enqueue a GenerationJob and receive its token events on an asyncio queue. Between two
decode steps the thread runs queued model calls (adapter loads, health checks), removes rows whose
clients went away, admits waiting requests first come first served up to `max_batch_size` (their
prompts prefilled and merged into the running KV cache, serving.decode_batch.DecodeBatch.join), then
decodes one token for every row. A request arriving while a batch decodes joins at the next step; a
finished row leaves at once. Why not transformers' continuous-batching manager: it has no notion of
LoRA adapters, and plain forward passes on its model are unsafe while it runs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from serving.generation import CausalLMEngine, GenerationJob, TokenEvent, merge_events

logger = logging.getLogger("raylm.serving")


@dataclass(eq=False)
class _Stream:
    """One request as the scheduler sees it."""

    job: GenerationJob
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False
    held: TokenEvent | None = None  # events merged while stream_interval_s has not passed
    last_sent: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class StepRecord:
    """One model forward: which requests (job ids) it advanced, and whether it was a prefill."""

    kind: str  # "prefill" or "decode"
    jobs: tuple[int, ...]


class Scheduler:
    """The model thread of a causal-LM replica: continuous batching plus serialized model calls."""

    def __init__(
        self,
        engine: CausalLMEngine,
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float = 0.0,
        join_wait_s: float = 0.0,
        stream_interval_s: float = 0.0,
        init_thread: Callable[[], None] | None = None,
        on_step: Callable[[str, int, list[float]], None] | None = None,
        step_log_size: int = 10_000,
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.join_wait_s = join_wait_s
        self.stream_interval_s = stream_interval_s
        self._init_thread = init_thread
        # on_step(kind, batch_size, queue_waits_s): called on the event loop of the step's requests.
        self._on_step = on_step
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=step_log_size)
        self._waiting: collections.deque[_Stream] = collections.deque()
        self._calls: collections.deque[tuple[Callable, tuple, concurrent.futures.Future]] = collections.deque()
        self._running: dict[int, _Stream] = {}
        self._joining: list[_Stream] = []  # admitted, prefilled after this step's model calls
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="raylm-model", daemon=True)
        self._thread.start()

    # ---- called from the event loop -------------------------------------------------------------
    async def events(self, job: GenerationJob) -> AsyncIterator[TokenEvent]:
        """The job's token events until it finishes. Closing the iterator early (client gone,
        task cancelled) takes the row out of the batch at the next step."""
        stream = _Stream(job, asyncio.Queue(), asyncio.get_running_loop())
        with self._wakeup:
            if self._stopped:
                raise RuntimeError("the model thread has stopped")
            self._waiting.append(stream)
            self._wakeup.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                # Events that piled up while this consumer was busy go out as one.
                while not isinstance(item, BaseException) and item.finish_reason is None and not stream.queue.empty():
                    following = stream.queue.get_nowait()
                    item = following if isinstance(following, BaseException) else merge_events(item, following)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                with self._wakeup:
                    stream.cancelled = True
                    self._wakeup.notify()

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run `fn(*args)` on the model thread between two decode steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wakeup:
            if self._stopped:
                raise RuntimeError("the model thread has stopped")
            self._calls.append((fn, args, future))
            self._wakeup.notify()
        return future

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join(timeout_s)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def jobs_in_flight(self) -> list[tuple[GenerationJob, bool]]:
        """Every request this replica holds and has not answered: (job, decoding), decoding False while it
        waits to join the batch. A job leaves before its last event is handed to its request, so a job
        listed here has not been answered yet (tests/test_serving_scaling.py kills a replica on that)."""
        with self._wakeup:
            waiting = [(s.job, False) for s in [*self._waiting, *self._joining] if not s.cancelled]
            running = [(s.job, True) for s in list(self._running.values()) if not s.cancelled]
        return waiting + running

    # ---- the model thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        if self._init_thread is not None:
            self._init_thread()
        batch = self.engine.start_batch()
        while True:
            with self._wakeup:
                while not (self._stopped or self._calls or self._waiting or batch.size):
                    self._wakeup.wait()
                if self._stopped:
                    break
                calls = list(self._calls)
                self._calls.clear()
                cancelled = [s for s in self._running.values() if s.cancelled]
                admitted = self._joining = self._admit(batch)
            for fn, args, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # handed to the caller
                        future.set_exception(exc)
            if cancelled:
                batch.remove([s.job for s in cancelled])
                for stream in cancelled:
                    self._running.pop(id(stream.job), None)
            try:
                if admitted:
                    self._prefill(batch, admitted)
                if batch.size:
                    self._decode(batch)
            except Exception as exc:  # a failed forward fails the requests in it, not the thread
                logger.exception("decode step failed; failing the %d requests in the batch", batch.size)
                failed = list(self._running.values())
                self._running.clear()
                batch.close()
                batch = self.engine.start_batch()
                self._deliver([(s, exc) for s in failed])
        batch.close()
        with self._wakeup:
            leftover = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
            self._running.clear()
        self._deliver([(s, RuntimeError("the model thread has stopped")) for s in leftover])

    def _admit(self, batch) -> list[_Stream]:
        """Waiting requests that join now, first come first served (called holding the lock)."""
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft()
        if not self._waiting or (batch.size and not batch.can_merge):
            return []
        if batch.size and time.perf_counter() - self._waiting[0].job.enqueued_at < self.join_wait_s:
            # A running batch keeps decoding while arrivals gather, so that they prefill in one forward
            # instead of one forward per step (join_wait_s; 0: every step admits what has arrived).
            return []
        if not batch.size and self.batch_wait_timeout_s > 0:
            # An idle replica waits this long after the first arrival so that a burst prefills together.
            deadline = self._waiting[0].job.enqueued_at + self.batch_wait_timeout_s
            while len(self._waiting) < self.max_batch_size and not self._stopped and time.perf_counter() < deadline:
                self._wakeup.wait(deadline - time.perf_counter())
        admitted = []
        while self._waiting and batch.size + len(admitted) < self.max_batch_size:
            stream = self._waiting.popleft()
            if not stream.cancelled:
                admitted.append(stream)
        return admitted

    def _prefill(self, batch, admitted: list[_Stream]) -> None:
        now = time.perf_counter()
        waits = [now - s.job.enqueued_at for s in admitted]
        ready, failed = [], []
        missing = self.engine.adapters_missing({s.job.adapter for s in admitted if s.job.adapter})
        for stream in admitted:
            (failed if stream.job.adapter in missing else ready).append(stream)
        for stream in ready:
            self._running[id(stream.job)] = stream
        self._joining = []
        self._deliver([(s, KeyError(f"adapter {s.job.adapter!r} is not loaded")) for s in failed])
        if not ready:
            return
        events = batch.join([s.job for s in ready])
        self.step_log.append(StepRecord("prefill", tuple(id(s.job) for s in ready)))
        self._emit(events, "prefill", len(ready), waits)

    def _decode(self, batch) -> None:
        jobs = tuple(id(row.job) for row in batch.rows)
        events = batch.decode()
        self.step_log.append(StepRecord("decode", jobs))
        self._emit(events, "generate", len(jobs), [])

    def _emit(self, events: list[tuple[GenerationJob, TokenEvent]], kind: str, size: int, waits: list[float]) -> None:
        now = time.perf_counter()
        out: list[tuple[_Stream, TokenEvent]] = []
        for job, event in events:
            stream = self._running.get(id(job))
            if stream is None:
                continue
            stream.held = merge_events(stream.held, event)
            if event.finish_reason is not None:
                del self._running[id(job)]
            if event.finish_reason is not None or now - stream.last_sent >= self.stream_interval_s:
                out.append((stream, stream.held))
                stream.held, stream.last_sent = None, now
        self._deliver(out, (kind, size, waits))

    def _deliver(self, items: list[tuple[_Stream, TokenEvent | BaseException]], step=None) -> None:
        """Hand events to the event loops of their requests: one callback per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        if step is not None and self._on_step is not None and not by_loop:
            loops = {s.loop for s in self._running.values()}
            by_loop = {loop: [] for loop in loops}
        for index, (loop, batch_items) in enumerate(by_loop.items()):
            try:
                loop.call_soon_threadsafe(_put_all, batch_items, step if index == 0 else None, self._on_step)
            except RuntimeError:  # that event loop is closed: its requests are gone
                pass


def _put_all(items, step, on_step) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)
    if step is not None and on_step is not None:
        try:
            on_step(*step)
        except Exception:  # metrics never break decoding
            logger.exception("recording step metrics failed")
