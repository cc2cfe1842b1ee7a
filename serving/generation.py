"""The causal-LM engine of the server: loads an export once (weights, tokenizer, chat template, optional
int8), keeps LoRA adapters resident in one peft model, and hands out running decode batches
(serving.decode_batch, where padding-aware batched decoding with per-request sampling lives).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from serving.decode_batch import (  # noqa: F401  (request types re-exported: callers build jobs next to the engine)
    DecodeBatch,
    GenerationJob,
    SamplingParams,
    TokenEvent,
    merge_events,
)
from serving.export_format import ModelExport, read_adapter
from serving.int8 import Int8DynamicLinear, quantize_linear_int8  # noqa: F401  (re-exported)

logger = logging.getLogger("raylm.serving")

# ChatML, used when the export's tokenizer has no chat_template (documented in docs/serving.md).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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
