"""Structured answers for engines that constrain sampling with a grammar (llama.cpp).

A JSON schema becomes a grammar over the answer's characters, so the answer always
parses. Two things the grammar alone does not give:

- **An end within the token budget.** A schema string without ``maxLength`` or an array
  without ``maxItems`` lets a small model write until ``max_tokens`` cuts the JSON. The
  schema the grammar is built from is therefore *bounded*: strings get at most
  ``MAX_STRING`` characters, arrays ``MAX_ITEMS`` items, objects only their declared
  properties (unless the schema says otherwise). Every answer of the bounded schema
  validates against the original one. ``json_object`` uses a bounded JSON grammar too.
  If ``max_tokens`` still cuts the answer, it ends with ``finish_reason: "length"`` and
  the cut text, as OpenAI does (the OpenAI SDK's ``parse`` then raises
  ``LengthFinishReasonError``).
- **Keywords no grammar expresses** (``minimum``, ``multipleOf``, ``uniqueItems``...):
  the answer is validated against the original schema after generation; one that does
  not validate fails the task with the validator's reason, never comes back as ``done``.

Tool calls are JSON too: a forced call is an answer constrained to the tool's parameters
(one tool) or to ``{"name", "arguments"}`` over the tools offered (``required``); an
``auto`` choice constrains the answer to either a call or ``{"answer": "..."}``.
"""

from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass
from typing import Any

from .base import EngineError, Request

MAX_STRING = 200  # characters of a string the schema leaves unbounded
MAX_ITEMS = 8  # items of an array the schema leaves unbounded

# A JSON object of at most 16 members whose values are scalars, arrays of at most 16
# scalars, or objects of at most 16 scalar members; keys of at most 40 characters, other
# strings of at most 200.
JSON_OBJECT_GBNF = r"""
root ::= "{" ws ( member ( "," ws member ){0,15} )? "}"
member ::= key ":" ws value ws
value ::= scalar | array | inner
inner ::= "{" ws ( pair ( "," ws pair ){0,15} )? "}"
pair ::= key ":" ws scalar ws
key ::= "\"" char{1,40} "\""
array ::= "[" ws ( scalar ws ( "," ws scalar ws ){0,15} )? "]"
scalar ::= string | number | "true" | "false" | "null"
string ::= "\"" char{0,200} "\""
char ::= [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
number ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?
ws ::= [ \t\n]{0,2}
"""

_SUBSCHEMAS = ("items", "additionalProperties", "not", "contains")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def bounded(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` whose every answer is short and validates against ``schema``."""
    out = copy.deepcopy(schema)
    _bound(out)
    return out


def _bound(node: Any) -> None:
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    free_text = not any(k in node for k in ("enum", "const", "pattern", "format", "$ref"))
    if "string" in kinds and free_text and "maxLength" not in node:
        node["maxLength"] = max(MAX_STRING, int(node.get("minLength", 0)))
    if "array" in kinds and "maxItems" not in node and "prefixItems" not in node:
        node["maxItems"] = max(MAX_ITEMS, int(node.get("minItems", 0)))
    if (
        kind in (None, "object")
        and isinstance(node.get("properties"), dict)
        and "additionalProperties" not in node
    ):
        node["additionalProperties"] = False
    if kind == "object" and not node.get("properties") and "additionalProperties" not in node:
        node["properties"], node["additionalProperties"] = {}, False
    for key in _SUBSCHEMAS:
        _bound(node.get(key))
    for key in _SCHEMA_LISTS:
        for sub in node.get(key) or []:
            _bound(sub)
    for key in _SCHEMA_MAPS:
        for sub in (node.get(key) or {}).values():
            _bound(sub)


def schema_grammar(schema: dict[str, Any]) -> str:
    """The GBNF grammar of a JSON schema (llama-cpp-python's converter), with strings that
    cannot hold raw control characters: its ``char`` rule lets a model write a raw newline
    inside a string, which no strict JSON parser accepts."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    grammar: str = json_schema_to_gbnf(json.dumps(schema))
    loose = 'char ::= [^"\\\\] |'
    if loose not in grammar:
        raise EngineError("llama.cpp's JSON-schema grammar changed: cannot bound its strings")
    return grammar.replace(loose, 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')


def check(answer: str, schema: dict[str, Any] | None) -> Any:
    """Parse ``answer`` and validate it against ``schema``; EngineError saying why not."""
    try:
        value = json.loads(answer)
    except ValueError as exc:
        raise EngineError(f"the answer is not valid JSON ({exc})") from None
    if schema:
        import jsonschema_rs  # a dependency

        try:
            jsonschema_rs.validate(schema, value)
        except jsonschema_rs.ValidationError as exc:
            raise EngineError(
                f"the answer does not validate against the schema: {getattr(exc, 'message', exc)}"
            ) from None
    return value


def tool_schema(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}


def call_id() -> str:
    return "call_" + secrets.token_urlsafe(12)


@dataclass(frozen=True)
class Plan:
    """How to constrain one answer: the grammar's schema (or the JSON-object grammar),
    the schema to validate against, and how to read the answer back."""

    mode: str  # "text", "json", "tool" (forced: one named tool), "tools" (forced: any), "auto"
    grammar_schema: dict[str, Any] | None = None
    schema: dict[str, Any] | None = None  # validated after generation
    tool: str | None = None  # mode "tool": the function called
    json_object: bool = False  # the bounded JSON-object grammar

    @property
    def streams(self) -> bool:
        """Whether the answer is content a reader may see piece by piece."""
        return self.mode in ("text", "json")


def plan(request: Request) -> Plan:
    tools = request.tools if request.uses_tools else []
    if tools:
        choice = request.tool_choice
        by_name = {t["function"]["name"]: t for t in tools}
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            if name not in by_name:
                raise EngineError(f"tool_choice names {name!r}, which is not in tools")
            schema = tool_schema(by_name[name])
            return Plan("tool", bounded(schema), schema, tool=name)
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": n}, "arguments": tool_schema(t)},
                "required": ["name", "arguments"],
            }
            for n, t in by_name.items()
        ]
        if choice == "required":
            schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
            return Plan("tools", bounded(schema), schema)
        answer = {
            "type": "object",
            "properties": {"answer": {"type": "string"}},
            "required": ["answer"],
        }
        schema = {"anyOf": [*calls, answer]}
        return Plan("auto", bounded(schema), schema)
    fmt = request.response_format or {}
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        return Plan("json", bounded(schema), schema)
    if fmt.get("type") == "json_object":
        return Plan("json", json_object=True)
    return Plan("text")


def tool_prompt(request: Request, mode: str) -> str:
    """The system text that tells the model which tools exist and how to answer."""
    lines = ["You can call these functions:"]
    for t in request.tools:
        fn = t["function"]
        desc = f": {fn['description']}" if fn.get("description") else ""
        lines.append(
            f"- {fn['name']}{desc}. Parameters (JSON schema): "
            + json.dumps(tool_schema(t), separators=(",", ":"))
        )
    if mode == "tool" and isinstance(request.tool_choice, dict):
        name = request.tool_choice["function"]["name"]
        lines.append(f"Answer with the JSON arguments of {name}.")
    elif mode == "tools":
        lines.append('Answer with a JSON object {"name": FUNCTION, "arguments": {...}}.')
    else:
        lines.append(
            'To call a function, answer with {"name": FUNCTION, "arguments": {...}}; '
            'to answer the user directly, answer with {"answer": "your answer"}.'
        )
    return "\n".join(lines)


def read_answer(p: Plan, text: str) -> tuple[str, list[dict[str, Any]] | None]:
    """Content and tool calls from a complete constrained answer (validated first)."""
    if p.mode in ("text",):
        return text, None
    value = check(text, p.schema)
    if p.mode == "json":
        if p.json_object and not isinstance(value, dict):
            raise EngineError("the answer is not a JSON object")
        return text, None
    if p.mode == "tool":
        return "", [_call(p.tool or "", value)]
    if "answer" in value and "name" not in value:
        return str(value["answer"]), None
    return "", [_call(value["name"], value["arguments"])]


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": call_id(),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def as_chat(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages with tool calls and tool answers as plain text, for a chat template that
    knows only role and content."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        calls = m.get("tool_calls") or []
        if calls:
            said = [
                json.dumps(
                    {
                        "name": c["function"]["name"],
                        "arguments": _json_or_text(c["function"]["arguments"]),
                    }
                )
                for c in calls
            ]
            content = "\n".join([content, *said]).strip()
        role = m["role"]
        if role in ("tool", "function"):
            role = "user"
            content = f"Result of {m.get('name') or m.get('tool_call_id') or 'the call'}: {content}"
        out.append({"role": role, "content": content})
    return out


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
