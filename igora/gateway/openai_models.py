"""Request and response bodies of the OpenAI-compatible API, as Pydantic models.

Requests are strict (no silent type coercion: ``"1"`` is not an integer) so that
malformed input is a 400, never a surprise further down. Fields OpenAI defines but
Igora cannot honour either have no effect on the answer (``presence_penalty``,
``frequency_penalty``, ``logit_bias``) or are refused with a clear 400 (legacy
``functions``, ``suffix``, ``best_of > 1``, ...); docs/gateway.md lists them all. Unknown
fields are accepted and ignored, as many OpenAI clients send a few of their own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..protocol import (
    MAX_CHOICES,
    MAX_DIMENSIONS,
    MAX_ID,
    MAX_INPUTS,
    MAX_MESSAGES,
    MAX_TEXT,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_STOP = 16
MAX_STOP_LENGTH = 1_000
MAX_USER = 256

GENERIC_MODELS = frozenset({"", "default", "igora", "auto", "any"})
"""Model names that mean "any worker" (as a task naming no model)."""


Text = Annotated[str, Field(max_length=MAX_TEXT)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Request):
    include_usage: bool | None = Field(
        None, description="Send a last chunk with `usage` and no choices before `[DONE]`."
    )


class ContentPart(_Request):
    type: str = Field(..., max_length=64, description="Only `text` is supported.")
    text: str | None = Field(None, max_length=MAX_TEXT)


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class FunctionCall(_Request):
    name: str = Field(..., max_length=MAX_ID)
    arguments: str = Field(..., max_length=MAX_TEXT, description="A JSON object, as text.")


class ToolCall(_Request):
    id: str = Field(..., max_length=MAX_ID)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Role
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: str | None = Field(None, max_length=MAX_ID)
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = Field(None, max_length=MAX_ID)


class FunctionSpec(_Request):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=MAX_TEXT)
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of the arguments (an object)."
    )
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Request):
    name: str = Field(..., max_length=64)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Request):
    name: str = Field(..., max_length=64)
    description: str | None = Field(None, max_length=MAX_TEXT)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = Field(
        None, description="With type `json_schema`: the schema the answer follows."
    )


class _Sampling(_Request):
    """Parameters shared by chat and text completions."""

    model: str | None = Field(
        None,
        max_length=MAX_ID,
        description="A model served on the market (see `GET /v1/models`). Missing, empty, "
        "`default`, `igora`, `auto` or `any`: any worker answers.",
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"Up to {MAX_STOP} non-empty strings that end the answer."
    )
    n: int | None = Field(
        None,
        ge=1,
        le=MAX_CHOICES,
        description="Number of choices (n > 1 needs a worker offering `n`).",
    )
    user: str | None = Field(
        None,
        max_length=MAX_USER,
        description="End-user id: logged by the gateway, not put on the market.",
    )
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Ignored.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Ignored.")
    logit_bias: dict[str, float] | None = Field(None, description="Ignored.")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = Field(
        None, description="Token log probabilities (a worker offering `logprobs`)."
    )
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    functions: list[dict[str, Any]] | None = Field(
        None, description="Legacy: not supported (use tools)."
    )
    function_call: str | dict[str, Any] | None = Field(None, description="Ignored.")
    parallel_tool_calls: bool | None = Field(None, description="Ignored: one call at most.")
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=128)] = Field(
        ..., description="The text to complete (a list must hold exactly one string)."
    )
    max_tokens: int | None = Field(
        16, ge=1, le=MAX_TOKENS_LIMIT, description="As OpenAI's legacy API: 16 by default."
    )
    echo: bool | None = Field(False, description="Put the prompt before the answer.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, ge=1, le=20, description="Only 1 is supported.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Not supported.")


class ResponsesPart(_Request):
    """A part of an input message's content (``input_text``, an assistant's
    ``output_text`` or ``refusal``; others are refused by the translation)."""

    type: str = Field(..., max_length=64)
    text: str | None = Field(None, max_length=MAX_TEXT)
    refusal: str | None = Field(None, max_length=MAX_TEXT)


PartList = Annotated[list[ResponsesPart], Field(max_length=MAX_MESSAGES)]


class ResponsesItem(_Request):
    """An item of ``input``: a message (``role``, ``content``; ``type`` ``message`` or
    absent), a ``function_call`` or a ``function_call_output``; which fields an item needs
    is checked by the translation, which names the item in its 400."""

    type: str | None = Field(None, max_length=64)
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Text | PartList | None = None
    call_id: str | None = Field(None, max_length=MAX_ID)
    name: str | None = Field(None, max_length=64)
    arguments: str | None = Field(None, max_length=MAX_TEXT)
    output: Text | PartList | None = None


class ResponsesTool(_Request):
    """A tool: ``function`` ones (flat, not under ``function`` as in chat) are served."""

    type: str = Field(..., max_length=64)
    name: str | None = Field(None, max_length=64)
    description: str | None = Field(None, max_length=MAX_TEXT)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesTextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = Field(None, max_length=MAX_TEXT)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesText(_Request):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = Field(None, max_length=16, description="Ignored.")


class ResponsesRequest(_Request):
    """``POST /v1/responses`` (docs/gateway.md lists what each field does)."""

    model: str | None = Field(
        None, max_length=MAX_ID, description=_Sampling.model_fields["model"].description
    )
    input: Text | Annotated[list[ResponsesItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    include: Annotated[list[str], Field(max_length=16)] | None = None
    tools: Annotated[list[ResponsesTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    text: ResponsesText | None = None
    stream: bool | None = False
    store: bool | None = Field(None, description="Accepted; nothing is stored.")
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None
    user: str | None = Field(None, max_length=MAX_USER, description="Logged only.")
    previous_response_id: str | None = Field(None, description="Not supported.")
    conversation: str | dict[str, Any] | None = Field(None, description="Not supported.")
    prompt: dict[str, Any] | None = Field(None, description="Not supported.")
    background: bool | None = Field(None, description="Only false is supported.")
    parallel_tool_calls: bool | None = Field(None, description="Ignored.")


# ---------------------------------------------------------------------- responses
class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class _Completion(_Response):
    """Fields shared by chat and text completions."""

    id: str
    created: int
    model: str
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletion(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class TextChoice(_Response):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(_Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]


class EmbeddingRequest(_Request):
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] = Field(
        ..., description="A text or a list of texts (token arrays are not supported)."
    )
    model: str | None = Field(
        None,
        max_length=MAX_ID,
        description="A model whose worker offers `embed`; `default` (or a generic name): "
        "any such worker.",
    )
    dimensions: int | None = Field(None, ge=1, le=MAX_DIMENSIONS)
    encoding_format: Literal["float", "base64"] | None = "float"
    user: str | None = Field(None, max_length=MAX_USER)


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Model(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    capabilities: list[str] | None = Field(
        None,
        description="What the workers serving it offer on it (Igora's field): chat, "
        "tools, json_object, json_schema, n, logprobs, embed.",
    )


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(_Response):
    error: ErrorDetail


class Health(_Response):
    status: str
    market: str
    connected: bool
    workers: int
    models: list[str]


class Balance(_Response):
    """``GET /v1/igora/balance`` (an Igora extension, not OpenAI's)."""

    object: Literal["igora.balance"] = "igora.balance"
    id: str = Field(..., description="The identity whose balance this is.")
    balance: int = Field(..., description="In millicredits (1,000 to a credit).")
    unit: Literal["millicredit"] = "millicredit"
    credits: str = Field(..., description="The same in credits, three decimals (`98.740`).")
