"""Request and response bodies (pydantic), published in the app's OpenAPI schema.

The /v1/completions, /v1/chat/completions and /v1/models shapes follow the OpenAI API so that
an ordinary OpenAI client works unchanged. Unknown fields are rejected (422) so a typo never
silently falls back to a default; accepted-but-fixed OpenAI fields are listed explicitly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _SamplingFields(_Strict):
    model: str = Field(description="Served model id, or '<model>:<adapter>' for a LoRA adapter.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate; capped by the server's max_tokens_limit.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end generation (not included).")
    seed: int | None = Field(None, description="Seed for sampling; same seed and prompt give the same output.")
    stream: bool = Field(False, description="Send tokens as server-sent events.")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    user: str | None = None
    stream_options: dict | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported; must be 0.")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported; must be 0.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(description="A prompt, or a list of prompts (one choice each).")
    echo: bool = Field(False, le=False, description="Not supported; must be false.")
    logprobs: int | None = Field(None, le=0, description="Not supported.")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = Field(None, description="Not supported.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raylm"
    root: str | None = Field(None, description="Base model of a LoRA adapter.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ClassifyRequest(_Strict):
    model: str | None = Field(None, description="Served model id (optional: the app serves one model).")
    input: str | list[str] = Field(description="A text or a list of texts.")

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassifyResult(BaseModel):
    label: str
    score: float
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassifyResult]
    usage: Usage


class EntitySpan(BaseModel):
    entity: str = Field(description="Entity type, e.g. PER, LOC, ORG (the BIO tag without its prefix).")
    start: int = Field(description="Character offset of the first character in the input text.")
    end: int = Field(description="Character offset one past the last character.")
    text: str
    score: float


class NerResult(BaseModel):
    entities: list[EntitySpan]


class NerResponse(BaseModel):
    model: str
    results: list[NerResult]
    usage: Usage


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
