"""Typed arguments of the serving app builder (`args:` of an application in a Serve config file).

Imports neither torch nor ray, so Serve config files can be validated anywhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ServingArgs(BaseModel):
    """Everything `serving.app:build` needs; Serve deployment options (replicas, autoscaling,
    max_ongoing_requests, max_queued_requests, ...) stay in the config's `deployments:` section."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    export_dir: str = Field(description="Directory written by `python -m training.export` (see serving.export_format).")
    served_model_name: str | None = Field(None, description="Model id clients send; default: raylm.json model_name.")
    adapters_dir: str | None = Field(
        None, description="Directory of LoRA adapters `<adapters_dir>/<name>/`, served as model id `<base>:<name>`."
    )
    max_adapters_per_replica: int = Field(4, ge=1, description="LRU size of resident LoRA adapters per replica.")
    max_batch_size: int = Field(
        8, ge=1, description="Most requests per batch: rows decoding together in a causal-LM replica (continuous "
        "batching, further arrivals queue first come first served), @serve.batch size for encoders. 1: no batching."
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="How long an idle replica waits after a first request for others to batch with it."
    )
    join_wait_s: float = Field(
        0.0, ge=0, description="How long requests arriving while a causal-LM batch decodes may wait so that they "
        "join it together (one prefill forward for several); 0: they join at the next decode step."
    )
    stream_interval_s: float = Field(
        0.0, ge=0, description="Longest a request's tokens are held and merged before going to its client "
        "(0: each token as soon as it decodes)."
    )
    quantize_int8: bool = Field(False, description="int8 dynamic quantization of nn.Linear (CPU replicas only).")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per replica; default: what Ray assigns (num_cpus)."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped in the export. Off by default.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the export's (fallback: ChatML).")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request does not set it.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask for (else 400).")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens (else 400); default: raylm.json max_seq_len."
    )
    max_inputs_per_request: int = Field(64, ge=1, description="Texts per classify/ner request or prompts per completion.")
    max_body_bytes: int = Field(1_000_000, ge=1, description="Request body limit in bytes (else 413).")
    require_api_key: bool = Field(True, description="Refuse to start without keys; false only for local endpoints.")
    api_keys_env: str | None = Field("RAYLM_API_KEYS", description="Env var holding comma-separated API keys.")
    api_keys_file: str | None = Field(None, description="File with one API key per line ('#' comments).")
    open_paths: list[str] = Field(["/healthz"], description="Paths served without an API key.")
    pii_masking: bool = Field(
        False, description="Mask emails, phones, CN ID cards/mobiles, bank cards, IPv4 addresses and IBANs in "
        "prompts, audit records and logs (exception text included)."
    )
    pii_mask_output: bool = Field(
        False, description="Mask the same PII in generated text too (streams then hold each line back until it ends)."
    )
    observers: list[str] = Field(
        [], description="Import paths 'module:Class' of request/response observers (see serving.observers)."
    )
    health_check_timeout_s: float = Field(10.0, gt=0, description="A model call slower than this fails the health check.")

    @model_validator(mode="after")
    def _check(self) -> "ServingArgs":
        problems = []
        if self.quantize_int8 and self.device != "cpu":
            problems.append("quantize_int8: torch dynamic int8 runs on CPU only; set device: cpu or quantize_int8: false")
        if self.quantize_int8 and self.adapters_dir:
            problems.append("quantize_int8: LoRA adapters need a float base; unset adapters_dir or quantize_int8")
        if self.quantize_int8 and self.dtype != "float32":
            problems.append("dtype: int8 dynamic quantization starts from float32; set dtype: float32")
        for path in self.observers:
            if ":" not in path:
                problems.append(f"observers: '{path}' must be 'module:Class'")
        if problems:
            raise ValueError("; ".join(problems))
        return self
