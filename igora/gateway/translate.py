"""Request translation: an OpenAI request becomes a ``Job``, the task's options in the
protocol's shapes (docs/protocol.md 4.5). Bad or unsupported parameters raise
``OpenAIError`` (400) before anything reaches the market."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from ..protocol import TaskField, TaskKind
from .errors import OpenAIError
from .openai_models import (
    GENERIC_MODELS,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesItem,
    ResponsesPart,
    ResponsesRequest,
)


def market_model(name: str | None) -> str | None:
    """The market model a request's ``model`` names (None: any worker)."""
    if name is None or name.strip().lower() in GENERIC_MODELS:
        return None
    return name


@dataclass
class Job:
    """One API request, translated for the market."""

    kind: str  # "chat", "text" or "embed"
    prompt: str | list[dict[str, Any]] | None
    requested: str | None
    options: dict[str, Any]
    stream: bool
    include_usage: bool
    user: str | None
    echo: str = ""
    encoding: str | None = None  # embeddings: "float" or "base64"
    echoed: dict[str, Any] = field(default_factory=dict)  # responses: settings repeated

    @property
    def model(self) -> str | None:
        return market_model(self.requested)

    @property
    def prefix(self) -> str:
        return {"chat": "chatcmpl-", "responses": "resp_"}.get(self.kind, "cmpl-")


def _common_options(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> dict[str, Any]:
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(
            400,
            "stream_options is only allowed when stream is true.",
            param="stream_options",
            code="invalid_value",
        )
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "max_tokens": max_tokens,
        "stop": body.stop,
    }


def _unsupported(param: str, what: str) -> OpenAIError:
    return OpenAIError(
        400, f"{param} is not supported: {what}.", param=param, code="unsupported_parameter"
    )


def _chat_options(body: ChatCompletionRequest) -> dict[str, Any]:
    """Tools, response format, choices and log probabilities, in the task's shapes (OpenAI's
    own objects; docs/protocol.md 4.5)."""
    if body.functions:
        raise _unsupported("functions", "the legacy functions API is replaced by tools")
    if body.top_logprobs and not body.logprobs:
        raise OpenAIError(
            400, "top_logprobs needs logprobs: true.", param="top_logprobs", code="invalid_value"
        )
    if body.tool_choice is not None and not body.tools and body.tool_choice != "none":
        raise OpenAIError(
            400, "tool_choice needs tools.", param="tool_choice", code="invalid_value"
        )
    options: dict[str, Any] = {}
    if body.tools:
        options["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
        if body.tool_choice is not None:
            choice = body.tool_choice
            options["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
            if not isinstance(choice, str) and choice.function.name not in {
                t.function.name for t in body.tools
            }:
                raise OpenAIError(
                    400,
                    f"tool_choice names {choice.function.name!r}, which is not in tools.",
                    param="tool_choice",
                    code="invalid_value",
                )
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        out: dict[str, Any] = {"type": fmt.type}
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise OpenAIError(
                    400,
                    "response_format of type json_schema needs json_schema.",
                    param="response_format.json_schema",
                    code="missing_required_parameter",
                )
            spec = fmt.json_schema.model_dump(by_alias=True, exclude_none=True)
            spec.setdefault("schema", {"type": "object"})
            out["json_schema"] = spec
        options["response_format"] = out
    if body.n is not None and body.n > 1:
        options["n"] = body.n
    if body.logprobs:
        options["logprobs"] = True
        if body.top_logprobs:
            options["top_logprobs"] = body.top_logprobs
    return options


def chat_job(body: ChatCompletionRequest) -> Job:
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            parts = [(p.type, p.text if p.type == "text" else None) for p in m.content]
            content = _joined(parts, f"messages[{i}].content")
        else:
            content = m.content or ""
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.name and role in ("tool", "function"):
            message["name"] = m.name
        messages.append(message)
    max_tokens = body.max_completion_tokens or body.max_tokens
    stream_usage = bool(body.stream_options and body.stream_options.include_usage)
    options = {**_common_options(body, max_tokens), **_chat_options(body)}
    return Job("chat", messages, body.model, options, bool(body.stream), stream_usage, body.user)


def text_job(body: CompletionRequest) -> Job:
    if body.n is not None and body.n > 1:
        raise _unsupported(
            "n", "legacy completions answer with one choice (use /v1/chat/completions for several)"
        )
    if body.best_of is not None and body.best_of > 1:
        raise _unsupported("best_of", "Igora answers with one choice per request")
    if body.logprobs:
        raise _unsupported("logprobs", "workers do not report token probabilities")
    if body.suffix:
        raise _unsupported("suffix", "workers complete at the end of the prompt only")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise OpenAIError(
                400,
                "prompt must be a string or a list of exactly one string "
                "(send one request per prompt).",
                param="prompt",
                code="unsupported_value",
            )
        prompt = prompt[0]
    stream_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Job(
        "text",
        prompt,
        body.model,
        _common_options(body, body.max_tokens),
        bool(body.stream),
        stream_usage,
        body.user,
        echo=prompt if body.echo else "",
    )


def embed_job(body: EmbeddingRequest) -> Job:
    texts = body.input if isinstance(body.input, list) else [body.input]
    options = {
        "_extra": {
            TaskField.KIND: TaskKind.EMBED.value,
            TaskField.INPUTS: texts,
            TaskField.DIMENSIONS: body.dimensions,
        },
        "_pieces": False,
    }
    return Job(
        "embed", None, body.model, options, False, False, body.user, encoding=body.encoding_format
    )


# ---------------------------------------------------------------------- the Responses API
LOGPROBS_INCLUDE = "message.output_text.logprobs"
PART_TEXT = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}


def responses_job(body: ResponsesRequest) -> Job:
    """A Responses API request as the chat request it means (docs/gateway.md,
    ``/v1/responses``): checked as one, put on the market as one chat task."""
    for name in ("previous_response_id", "conversation", "prompt"):
        if getattr(body, name) is not None:
            raise _unsupported(
                name,
                "the gateway stores no responses or prompts; send the whole conversation in input",
            )
    if body.background:
        raise _unsupported("background", "answers come in the request's own response")
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        for i, item in enumerate(body.input):
            _add_item(messages, item, f"input[{i}]")
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "stream": bool(body.stream),
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "user": body.user,
    }
    tools = [_function_tool(t, i) for i, t in enumerate(body.tools or [])]
    if tools:
        chat["tools"] = tools
    if body.tool_choice is not None and (tools or body.tool_choice not in ("auto", "none")):
        chat["tool_choice"] = _tool_choice(body.tool_choice)  # auto, none: the default then
    fmt = body.text.format if body.text else None
    if fmt is not None:
        chat["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            spec = fmt.model_dump(by_alias=True, exclude_none=True, exclude={"type"})
            spec.setdefault("name", "answer")
            chat["response_format"]["json_schema"] = spec
    if body.top_logprobs or LOGPROBS_INCLUDE in (body.include or []):
        chat["logprobs"] = True
        chat["top_logprobs"] = body.top_logprobs
    try:
        request = ChatCompletionRequest.model_validate(
            {k: v for k, v in chat.items() if v is not None}
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise OpenAIError(400, f"Invalid request: {first.get('msg', 'invalid')}.") from None
    echoed = {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "parallel_tool_calls": True
        if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "text": {
            "format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
        },
        "top_logprobs": body.top_logprobs or 0,
        "user": body.user,
    }
    return replace(chat_job(request), kind="responses", echoed=echoed)


def _add_item(messages: list[dict[str, Any]], item: ResponsesItem, where: str) -> None:
    kind = item.type or "message"
    if kind == "reasoning":
        return  # a reasoning model's notes: nothing a chat model reads
    if kind == "message":
        if item.role is None:
            raise _missing(f"{where}.role")
        content = item.content if item.content is not None else ""
        messages.append({"role": item.role, "content": _text(content, f"{where}.content")})
        return
    if kind == "function_call":
        if not item.call_id or not item.name or item.arguments is None:
            raise _missing(f"{where}.call_id, name and arguments")
        call = {
            "id": item.call_id,
            "type": "function",
            "function": {"name": item.name, "arguments": item.arguments},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)  # one turn's text and calls
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        return
    if kind == "function_call_output":
        if not item.call_id or item.output is None:
            raise _missing(f"{where}.call_id and output")
        messages.append(
            {
                "role": "tool",
                "tool_call_id": item.call_id,
                "content": _text(item.output, f"{where}.output"),
            }
        )
        return
    raise OpenAIError(
        400,
        f"{where}: items of type {kind!r} are not supported (messages, function_call, "
        "function_call_output and reasoning items are).",
        param=where,
        code="unsupported_value",
    )


def _text(content: str | list[ResponsesPart], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = [
        (p.type, getattr(p, PART_TEXT[p.type]) if p.type in PART_TEXT else None) for p in content
    ]
    return _joined(parts, where)


def _joined(parts: list[tuple[str, str | None]], where: str) -> str:
    """The text of a message's parts (type, text), one a line; a part without text (an
    image, a file...) is a 400 naming it."""
    for j, (kind, text) in enumerate(parts):
        if text is None:
            raise OpenAIError(
                400,
                f"{where}[{j}]: only text parts are supported (got type {kind!r}).",
                param=f"{where}[{j}]",
                code="unsupported_value",
            )
    return "\n".join(text for _, text in parts if text is not None)


def _function_tool(tool: Any, i: int) -> dict[str, Any]:
    if tool.type != "function":
        raise OpenAIError(
            400,
            f"tools[{i}]: only function tools are supported (got type {tool.type!r}).",
            param=f"tools[{i}].type",
            code="unsupported_value",
        )
    if not tool.name:
        raise _missing(f"tools[{i}].name")
    spec = tool.model_dump(exclude_none=True, exclude={"type"})
    return {"type": "function", "function": spec}


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    name = choice.get("name")
    if choice.get("type") != "function" or not isinstance(name, str):
        raise OpenAIError(
            400,
            'tool_choice must be auto, none, required or {"type": "function", "name": ...}.',
            param="tool_choice",
            code="unsupported_value",
        )
    return {"type": "function", "function": {"name": name}}


def _missing(param: str) -> OpenAIError:
    return OpenAIError(
        400,
        f"Missing required parameter: {param!r}.",
        param=param,
        code="missing_required_parameter",
    )
