"""Padding-aware batched decoding for a causal-LM export, with per-request sampling and LoRA adapters.

Why a hand-written decode loop instead of `model.generate`: every request in a batch carries its own
temperature, top_p, seed, stop strings, max_tokens and adapter, and streams token by token; and a
batch of mixed lengths must give the same greedy output as each request alone. Left padding, an
attention mask and position ids counted from each row's first real token make that hold.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serving.export_format import ModelExport, read_adapter
from serving.int8 import Int8DynamicLinear, quantize_linear_int8  # noqa: F401  (re-exported)

logger = logging.getLogger("raylm.serving")

# ChatML, used when the export's tokenizer has no chat_template (documented in docs/serving.md).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
GREEDY_TEMPERATURE = 1e-5


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


class LoadedAdapter:
    """An adapter resident in the peft model. Serve's multiplexer evicts LRU adapters by calling
    `__del__`; deletion waits until no request pins it, so eviction never breaks a running batch."""

    def __init__(self, engine: "CausalLMEngine", name: str):
        self.engine = engine
        self.name = name
        self.evicted = False

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is None or self.evicted:
            return
        self.evicted = True
        engine._release_adapter(self)


class CausalLMEngine:
    """Loads an export once and runs decode batches on it. Not thread-safe by itself: the server runs
    every model call on one dedicated thread."""

    def __init__(
        self,
        export: ModelExport,
        *,
        adapters_dir: str | None = None,
        quantize_int8: bool = False,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        chat_template: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.export = export
        self.adapters_dir = Path(adapters_dir).expanduser() if adapters_dir else None
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(export.path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            export.path,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=getattr(torch, dtype),
        ).to(self.device)
        self.model.eval()
        self.quantized = False
        if quantize_int8:
            self.model = quantize_linear_int8(self.model)
            self.quantized = True
        self.chat_template = chat_template or (None if export.has_chat_template else FALLBACK_CHAT_TEMPLATE)
        self.stop_token_ids = self._stop_token_ids()
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = next(iter(self.stop_token_ids))
        self.max_seq_len = export.manifest.max_seq_len
        self._peft_model = None
        self.lock = threading.RLock()
        self._pins: dict[str, int] = {}
        self._pending_deletes: set[str] = set()
        self._adapters: dict[str, LoadedAdapter] = {}

    # ---- prompts -------------------------------------------------------------------------------
    def _stop_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat: the export's chat template, else ChatML."""
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- adapters ------------------------------------------------------------------------------
    # One lock guards the peft model's adapter set and every forward pass: Serve's multiplexer
    # evicts adapters from another thread, and peft must not change its adapters mid-forward.
    def adapter_key(self, name: str) -> str:
        """`<name>@<version>`: the key an adapter is loaded, pinned and batched under. The version is the identity
        of its weights file now (inode, mtime, size), so an adapter directory renamed into place under the same
        name (training.promote, training.export --publish-to --replace) gets a new key and is loaded anew, while
        the multiplexer's LRU evicts the old version once no request uses it."""
        if self.adapters_dir is None:
            raise FileNotFoundError("this deployment has no adapters_dir; set adapters_dir in the app args")
        st = (self.adapters_dir / name / "adapter_model.safetensors").stat()
        return f"{name}@{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"

    def load_adapter(self, name: str) -> LoadedAdapter:
        """Load `<adapters_dir>/<name>` into the shared peft model (called through serve.multiplexed). `name` may be
        an `adapter_key` (`<name>@<version>`): the directory is `<name>`, the peft adapter is called by the key."""
        if self.adapters_dir is None:
            raise FileNotFoundError("this deployment has no adapters_dir; set adapters_dir in the app args")
        if self.quantized:
            raise ValueError("LoRA adapters cannot be applied to an int8-quantized base; set quantize_int8: false")
        adapter = read_adapter(self.adapters_dir / name.partition("@")[0])
        if adapter.manifest.task != "causal-lm":
            raise ValueError(f"adapter '{name}' is for task {adapter.manifest.task}, not causal-lm")
        from peft import PeftModel

        with self.lock:
            if name in self._adapters:
                return self._adapters[name]
            self._pending_deletes.discard(name)
            if self._peft_model is None:
                self._peft_model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=name)
                self._peft_model.eval()
            elif name not in self._peft_model.peft_config:
                self._peft_model.load_adapter(adapter.path, adapter_name=name)
            handle = LoadedAdapter(self, name)
            self._adapters[name] = handle
            logger.info("loaded LoRA adapter %s from %s", name, adapter.path)
            return handle

    def pin_adapter(self, name: str) -> None:
        """Keep an adapter's weights while a request uses it, even if the LRU evicts it meanwhile."""
        with self.lock:
            self._pins[name] = self._pins.get(name, 0) + 1

    def unpin_adapter(self, name: str) -> None:
        with self.lock:
            self._pins[name] -= 1
            self._delete_unused_adapters_locked()

    def _release_adapter(self, handle: LoadedAdapter) -> None:
        with self.lock:
            if self._adapters.get(handle.name) is handle:
                del self._adapters[handle.name]
            self._pending_deletes.add(handle.name)
            self._delete_unused_adapters_locked()

    def _delete_unused_adapters_locked(self) -> None:
        for name in list(self._pending_deletes):
            if self._pins.get(name, 0) == 0 and name not in self._adapters and self._peft_model is not None:
                # peft keeps at least one adapter; an idle last one is harmless (base rows bypass it).
                if name in self._peft_model.peft_config and len(self._peft_model.peft_config) > 1:
                    self._peft_model.delete_adapter(name)
                    logger.info("unloaded LoRA adapter %s", name)
                self._pending_deletes.discard(name)

    @property
    def resident_adapters(self) -> list[str]:
        with self.lock:
            return sorted(self._adapters)

    # ---- decoding ------------------------------------------------------------------------------
    def start_batch(self, jobs: list[GenerationJob] = ()) -> "DecodeBatch":
        """A running batch; `jobs` join it at its first step."""
        batch = DecodeBatch(self)
        batch.pending.extend(jobs)
        return batch

    def generate(self, jobs: list[GenerationJob]) -> list[tuple[list[int], str, str]]:
        """Run jobs to completion as one batch: (token ids, text, finish_reason) per job."""
        batch = self.start_batch(jobs)
        results = {id(job): ([], [], "") for job in jobs}
        while not batch.done:
            for job, event in batch.step():
                ids, texts, _ = results[id(job)]
                ids.extend(t for t in event.token_ids if t not in self.stop_token_ids)
                texts.append(event.text_delta)
                results[id(job)] = (ids, texts, event.finish_reason or "")
        return [(ids, "".join(texts), reason) for ids, texts, reason in (results[id(job)] for job in jobs)]

    def adapters_missing(self, adapters: set[str]) -> set[str]:
        """Which of these adapters the peft model does not hold (all of them before the first load)."""
        with self.lock:
            held = set(self._peft_model.peft_config) if self._peft_model is not None else set()
        return {a for a in adapters if a} - held

    def check_health(self) -> None:
        """One forward pass on one token: raises if the model cannot answer."""
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([[self.pad_token_id]], device=self.device)).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("model produced non-finite logits")


class DecodeBatch:
    """A running batch that requests join and leave between decode steps (iteration-level batching).

    State between steps, one row per request: the DynamicCache of everything before each row's
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
        """Rows can join a running batch only when every cache layer is a plain growing DynamicLayer
        (a sliding-window layer drops old columns, and padding would shift what it keeps)."""
        if self.cache is None:
            return True
        return all(type(layer).__name__ == "DynamicLayer" for layer in self.cache.layers)

    def step(self) -> list[tuple[GenerationJob, TokenEvent]]:
        """Pending jobs join (their first tokens come from the prefill); otherwise one decode step."""
        if self.pending:
            jobs, self.pending = self.pending, []
            return self.join(jobs)
        return self.decode()

    def join(self, jobs: list[GenerationJob]) -> list[tuple[GenerationJob, TokenEvent]]:
        """Prefill `jobs` and merge their rows into the batch; one event (the first token) per job."""
        from transformers import DynamicCache

        engine = self.engine
        missing = engine.adapters_missing({job.adapter for job in jobs if job.adapter})
        if missing:
            raise KeyError(f"adapters {sorted(missing)} are not loaded")
        rows = [_RowState(job, _make_generator(job.params.seed) if job.params.temperature > GREEDY_TEMPERATURE else None)
                for job in jobs]
        longest = max(len(job.prompt_ids) for job in jobs)
        pad = engine.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(j.prompt_ids)) + list(j.prompt_ids) for j in jobs], device=engine.device)
        mask = torch.tensor([[0] * (longest - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=engine.device)
        cache = DynamicCache()
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
            old.keys = torch.cat([pad(old.keys, (0, 0, pad_old, 0)), pad(new.keys, (0, 0, pad_new, 0))], dim=0)
            old.values = torch.cat([pad(old.values, (0, 0, pad_old, 0)), pad(new.values, (0, 0, pad_new, 0))], dim=0)
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
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]
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
