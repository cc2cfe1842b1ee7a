"""Request and response bodies (pydantic), published in the app's OpenAPI schema.

The /v1/completions, /v1/chat/completions and /v1/models shapes follow the OpenAI API so that
an ordinary OpenAI client works unchanged. Unknown fields are rejected (422) so a typo never
silently falls back to a default; accepted-but-fixed OpenAI fields are listed explicitly.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_CHARS = 200
# OpenAI request fields this server does not implement: named in the 422 instead of "extra input".
UNSUPPORTED_FIELDS = {
    "tools": "tool and function calling are not supported by this server",
    "tool_choice": "tool and function calling are not supported by this server",
    "parallel_tool_calls": "tool and function calling are not supported by this server",
    "functions": "tool and function calling are not supported by this server",
    "function_call": "tool and function calling are not supported by this server",
    "response_format": "structured output (response_format) is not supported; ask for the format in the prompt",
    "logit_bias": "logit_bias is not supported",
    "top_logprobs": "logprobs are not supported",
    "best_of": "best_of is not supported (n and best_of are 1)",
    "suffix": "suffix (insertion) is not supported",
    "modalities": "this server returns text only",
    "audio": "this server returns text only",
}


def _valid_unicode(text: str) -> str:
    """JSON may carry lone surrogates (\\ud800): valid JSON, not text; tokenizers fail on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text holds an unpaired surrogate at character {exc.start}; send valid UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Strict(BaseModel):
    # strict: "0.5" is not a temperature and "yes" not a boolean; NaN/Infinity are not numbers.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _name_unsupported_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            named = [f"{k}: {UNSUPPORTED_FIELDS[k]}" for k in data if k in UNSUPPORTED_FIELDS and k not in cls.model_fields]
            if named:
                raise ValueError("; ".join(named))
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: Text = Field(description="Served model id, or '<model>:<adapter>' for a LoRA adapter.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate; capped by the server's max_tokens_limit.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = Field(
        None, description=f"Up to 4 strings of 1-{MAX_STOP_CHARS} characters that end generation (not included)."
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1,
                             description="Seed for sampling (a 64-bit integer); same seed and prompt give the same output.")
    stream: bool = Field(False, description="Send tokens as server-sent events.")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    user: Text | None = None
    stream_options: StreamOptions | None = None
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
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return stops

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(_SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="A prompt, or a non-empty list of prompts (one choice each). Token-id prompts are not supported."
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, value):
        if isinstance(value, list) and value and all(isinstance(v, int) or (isinstance(v, list) and v and all(
                isinstance(t, int) for t in v)) for v in value):
            raise ValueError("token-id prompts are not supported; send the prompt as text")
        return value

    echo: bool = Field(False, le=False, description="Not supported; must be false.")
    logprobs: int | None = Field(None, le=0, description="Not supported.")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(BaseModel):
    """One part of a message's content list. Text parts are joined with newlines; any other type
    (image_url, input_audio, file, ...) is refused with a 400 by the server: it reads text only."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Text
    text: Text | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | Annotated[list[ContentPart], Field(min_length=1)]
    name: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_tool_messages(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("role") in ("tool", "function"):
                raise ValueError(f"role '{data['role']}': tool and function calling are not supported by this server; "
                                 "send system, user, assistant or developer messages")
            if "tool_calls" in data or "function_call" in data:
                raise ValueError("tool_calls: tool and function calling are not supported by this server")
        return data


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False] | None = Field(None, description="Not supported: false or absent.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens (either may be sent).")

    @model_validator(mode="after")
    def _one_max_tokens(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ; send one of them")
            self.max_tokens = self.max_completion_tokens
        return self


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
    model: Text | None = Field(None, description="Served model id (optional: the app serves one model).")
    input: Text | list[Text] = Field(description="A text or a list of texts.")

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
