"""Padding-aware batched decoding for the causal-LM server: requests' types (sampling settings, jobs, token
events) and `DecodeBatch`, where requests join and leave between decode steps.

Why a hand-written decode loop instead of `model.generate`: every request in a batch carries its own
temperature, top_p, seed, stop strings, max_tokens and adapter, and streams token by token; and a
batch of mixed lengths must give the same greedy output as each request alone. Left padding, an
attention mask and position ids counted from each row's first real token make that hold. The engine
(serving.generation: loading an export, adapters, health) hands out batches with `start_batch`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from serving.kv_cache import GrowingCache, GrowingLayer, merge_rows, select_rows

if TYPE_CHECKING:
    from serving.generation import CausalLMEngine

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
GREEDY_TEMPERATURE = 1e-5
# Requests joining together are prefilled in groups of similar prompt length, each group padded to its longest
# prompt at most this many times its real tokens. One padded group costs what its padded tokens cost: 32 prompts
# of 19-238 tokens padded to 238 made a prefill 4x the real tokens and 73% of a request's model time at batch 32
# (benchmarks.serve_load); a group costs one more forward call (a few ms for a small model).
PREFILL_PADDING_LIMIT = 1.25


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI semantics: temperature 0 means greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: stop tokens are never chosen, so every run decodes max_tokens


@dataclass
class GenerationJob:
    """One request's prompt and settings, as handed to a batch."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request since its last event, and the text they make visible."""

    token_ids: tuple[int, ...]
    text_delta: str
    finish_reason: str | None  # None while running, then "stop" or "length"
    generated: int = 0  # tokens that count as output (stop tokens excluded)


@dataclass
class _RowState:
    job: GenerationJob
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    finished: bool = False


class DecodeBatch:
    """A running batch that requests join and leave between decode steps (iteration-level batching).

    State between steps, one row per request: the KV cache (serving.kv_cache) of everything before each row's
    pending token, `attention_mask` over the cache plus that token (0 on left padding), and
    `next_ids`, the pending tokens. `join` prefills new requests as a group (left-padded among
    themselves), picks their first tokens from the prefill logits, then merges them: the shorter of
    the two caches is left-padded with masked zeros to the other's length and the rows are
    concatenated. Each row's positions count its real tokens only, so a row sees the same positions,
    keys and values as when it runs alone; padding only adds masked slots. `step` decodes one token
    for every row; finished and cancelled rows leave at once, and left columns no row needs any more
    are trimmed."""

    def __init__(self, engine: CausalLMEngine):
        self.engine = engine
        self.rows: list[_RowState] = []
        self.pending: list[GenerationJob] = []  # join at the next `step()` (the `generate` path)
        self.cache = None
        self.attention_mask: torch.Tensor | None = None
        self.next_ids: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def done(self) -> bool:
        return not self.rows and not self.pending

    @property
    def can_merge(self) -> bool:
        """Rows can join a running batch only when every cache layer is a plain growing layer (a
        sliding-window layer drops old columns, and padding would shift what it keeps)."""
        if self.cache is None:
            return True
        return all(type(layer) is GrowingLayer for layer in self.cache.layers)

    def step(self) -> list[tuple[GenerationJob, TokenEvent]]:
        """Pending jobs join (their first tokens come from the prefill); otherwise one decode step."""
        if self.pending:
            jobs, self.pending = self.pending, []
            return self.join(jobs)
        return self.decode()

    def join(self, jobs: list[GenerationJob]) -> list[tuple[GenerationJob, TokenEvent]]:
        """Prefill `jobs` and merge their rows into the batch; one event (the first token) per job. Jobs
        are prefilled in groups of similar prompt length (PREFILL_PADDING_LIMIT), each merged as it comes,
        when the batch's cache can take rows while it decodes (can_merge), else all together."""
        missing = self.engine.adapters_missing({job.adapter for job in jobs if job.adapter})
        if missing:
            raise KeyError(f"adapters {sorted(missing)} are not loaded")
        groups = prefill_groups(jobs) if self.can_merge else [list(jobs)]
        return [event for group in groups for event in self._join_group(group)]

    def _join_group(self, jobs: list[GenerationJob]) -> list[tuple[GenerationJob, TokenEvent]]:
        engine = self.engine
        rows = [_RowState(job, _make_generator(job.params.seed) if job.params.temperature > GREEDY_TEMPERATURE else None)
                for job in jobs]
        longest = max(len(job.prompt_ids) for job in jobs)
        pad = engine.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(j.prompt_ids)) + list(j.prompt_ids) for j in jobs], device=engine.device)
        mask = torch.tensor([[0] * (longest - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=engine.device)
        cache = GrowingCache()
        next_ids = self._forward(rows, ids, mask, cache)
        events = self._advance_all(rows, next_ids)
        new_mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        if not self.rows:
            self.rows, self.cache, self.attention_mask, self.next_ids = rows, cache, new_mask, next_ids
        else:
            if not self.can_merge:
                raise RuntimeError("this model's cache cannot take rows while it decodes; join when the batch is empty")
            self._merge(rows, cache, new_mask, next_ids)
        self._drop_finished()
        return events

    def decode(self) -> list[tuple[GenerationJob, TokenEvent]]:
        """One token for every row."""
        if not self.rows:
            return []
        next_ids = self._forward(self.rows, self.next_ids, self.attention_mask, self.cache)
        events = self._advance_all(self.rows, next_ids)
        self.next_ids = next_ids
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(next_ids)], dim=1)
        self._drop_finished()
        return events

    def remove(self, jobs: list[GenerationJob]) -> None:
        """Rows leave without a last event (a client went away); the other rows are untouched."""
        gone = {id(job) for job in jobs}
        self.pending = [job for job in self.pending if id(job) not in gone]
        self._keep([i for i, row in enumerate(self.rows) if id(row.job) not in gone])

    def close(self) -> None:
        """Free the KV cache (idempotent)."""
        self.rows, self.pending = [], []
        self.cache = self.attention_mask = self.next_ids = None

    # ---- internals ------------------------------------------------------------------------------
    def _forward(self, rows: list[_RowState], input_ids, attention_mask, cache) -> torch.Tensor:
        engine = self.engine
        adapters = [row.job.adapter for row in rows]
        # Once peft has injected LoRA layers, the base model's modules are shared with it, so base rows
        # must also go through peft (as "__base__") to run without any adapter.
        with engine.lock, torch.inference_mode():
            if engine._peft_model is not None:
                model, extra = engine._peft_model, {"adapter_names": [a or BASE_ADAPTER for a in adapters]}
            else:
                model, extra = engine.model, {}
            # Positions count real tokens only, so a left-padded row sees the same positions as alone.
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1, **extra)
            logits = out.logits[:, -1, :].float()
            chosen = [self._choose(row, logits[i]) for i, row in enumerate(rows)]
        return torch.tensor([[t] for t in chosen], device=engine.device)

    def _advance_all(self, rows: list[_RowState], next_ids: torch.Tensor) -> list[tuple[GenerationJob, TokenEvent]]:
        return [(row.job, self._advance(row, int(token))) for row, token in zip(rows, next_ids[:, 0].tolist())]

    def _merge(self, rows: list[_RowState], cache, mask: torch.Tensor, next_ids: torch.Tensor) -> None:
        width = max(self.attention_mask.shape[1], mask.shape[1])
        pad_old, pad_new = width - self.attention_mask.shape[1], width - mask.shape[1]
        pad = torch.nn.functional.pad
        for old, new in zip(self.cache.layers, cache.layers):
            merge_rows(old, new)
        self.attention_mask = torch.cat([pad(self.attention_mask, (pad_old, 0)), pad(mask, (pad_new, 0))], dim=0)
        self.next_ids = torch.cat([self.next_ids, next_ids], dim=0)
        self.rows = self.rows + rows

    def _drop_finished(self) -> None:
        if any(row.finished for row in self.rows):
            self._keep([i for i, row in enumerate(self.rows) if not row.finished])

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.close()
            return
        index = torch.tensor(keep, device=self.engine.device)
        self.rows = [self.rows[i] for i in keep]
        mask = self.attention_mask.index_select(0, index)
        # Columns that are padding in every remaining row: drop them (the cache stops growing for rows
        # that have left). The pending token's column is never padding.
        first = int(mask.any(dim=0).nonzero()[0])
        for layer in self.cache.layers:
            select_rows(layer, index, first)
        self.attention_mask = mask[:, first:]
        self.next_ids = self.next_ids.index_select(0, index)

    def _choose(self, row: _RowState, logits: torch.Tensor) -> int:
        params = row.job.params
        if params.ignore_eos:
            logits = logits.index_fill(0, torch.tensor(sorted(self.engine.stop_token_ids), device=logits.device),
                                       float("-inf"))
        if row.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _RowState, token: int) -> TokenEvent | None:
        if row.finished:
            return None
        tokenizer = self.engine.tokenizer
        params = row.job.params
        finish = None
        if token in self.engine.stop_token_ids:
            finish = "stop"
        else:
            row.generated.append(token)
        text = tokenizer.decode(row.generated, skip_special_tokens=True)
        stop_at = _first_stop(text, params.stop)
        if stop_at is not None:
            text, finish = text[:stop_at], "stop"
        elif finish is None and (
            len(row.generated) >= params.max_tokens
            or len(row.job.prompt_ids) + len(row.generated) >= self.engine.max_seq_len
        ):
            finish = "length"
        if finish is None:
            # Hold back an incomplete UTF-8 sequence and any tail that may be the start of a stop string.
            visible = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
            visible -= _stop_prefix_overlap(text[:visible], params.stop)
        else:
            visible = len(text)
            row.finished = True
        delta = text[row.emitted_chars : max(visible, row.emitted_chars)]
        row.emitted_chars = max(visible, row.emitted_chars)
        return TokenEvent(token_ids=(token,), text_delta=delta, finish_reason=finish,
                          generated=int(token not in self.engine.stop_token_ids))


def prefill_groups(jobs: list[GenerationJob], padding_limit: float = PREFILL_PADDING_LIMIT) -> list[list[GenerationJob]]:
    """Jobs in groups of similar prompt length: shortest first, a group grows while padding every prompt to
    its longest costs at most `padding_limit` times the group's real tokens."""
    groups: list[list[GenerationJob]] = []
    real = 0
    for job in sorted(jobs, key=lambda j: len(j.prompt_ids)):
        length = len(job.prompt_ids)  # the longest so far: jobs come shortest first
        if groups and (len(groups[-1]) + 1) * length <= padding_limit * (real + length):
            groups[-1].append(job)
            real += length
        else:
            groups.append([job])
            real = length
    return groups


def merge_events(old: TokenEvent | None, new: TokenEvent | None) -> TokenEvent | None:
    """One event for two consecutive events of the same request."""
    if old is None or new is None:
        return old or new
    return TokenEvent(old.token_ids + new.token_ids, old.text_delta + new.text_delta, new.finish_reason,
                      old.generated + new.generated)


def _make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def _stop_prefix_overlap(text: str, stops: tuple[str, ...]) -> int:
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
