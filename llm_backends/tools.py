"""Tool calls (OpenAI ``tools``) as text: the documented prompt format for templates without tool support, and
the parser that turns a reply's ``<tool_call>`` blocks back into OpenAI tool calls.

Format (Qwen 3's own, used for every model): a call is ``<tool_call>`` + newline + a JSON object
``{"name": <function name>, "arguments": <arguments object>}`` + newline + ``</tool_call>``; a tool's result
comes back as ``<tool_response>`` + newline + the result + newline + ``</tool_response>`` in a user turn.
A template that knows tools (Qwen 3's) renders them itself; for others (Gemma 3) ``inline`` writes the tool
list into the system prompt and the calls and results into ordinary turns, in that same format.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_text(name: str, arguments) -> str:
    """One call as the model writes it (``arguments`` a dict or JSON text)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n{CLOSE}'


def inline(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages for a template without tool support: tools described in the system prompt, calls and results
    written into ordinary assistant and user turns."""
    out: list[dict] = []
    if tools:
        described = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + described})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": described})
    for message in messages:
        if message["role"] == "tool":
            result = f"<tool_response>\n{message['content']}\n</tool_response>"
            earlier = out[-1]["content"] if out and out[-1]["role"] == "user" else None
            if isinstance(earlier, str) and earlier.endswith("</tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + result}
            else:
                out.append({"role": "user", "content": result})
        elif message["role"] == "assistant" and message.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
            text = "\n".join(([message["content"]] if message.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": message["role"], "content": message.get("content") or ""})
    return out


def parse(text: str) -> tuple[str, list[ToolCall]]:
    """(the text outside tool-call blocks, the calls in them). A block that is not a JSON object with a string
    ``name`` stays in the text: the client sees what the model wrote rather than a call it did not make."""
    calls: list[ToolCall] = []

    def take(match: re.Match) -> str:
        try:
            data = json.loads(match.group(1))
        except ValueError:
            return match.group(0)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return match.group(0)
        arguments = data.get("arguments", {})
        calls.append(
            ToolCall(
                name=data["name"],
                arguments=arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
                id=f"call_{uuid.uuid4().hex[:24]}",
            )
        )
        return ""

    rest = BLOCK.sub(take, text)
    return rest.strip(), calls


class StreamingCalls:
    """Splits streamed answer text into plain text (emitted at once) and tool calls (emitted whole once their
    block closes). Text that might be the start of ``<tool_call>`` is held back until it cannot be."""

    def __init__(self):
        self._held = ""
        self._in_call = False

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self._held += text
        out, calls = [], []
        while True:
            if self._in_call:
                end = self._held.find(CLOSE)
                if end < 0:
                    return "".join(out), calls
                block = OPEN + self._held[: end + len(CLOSE)]
                self._held = self._held[end + len(CLOSE) :]
                self._in_call = False
                rest, found = parse(block)
                calls += found
                out.append(rest)
                continue
            start = self._held.find(OPEN)
            if start >= 0:
                out.append(self._held[:start])
                self._held = self._held[start + len(OPEN) :]
                self._in_call = True
                continue
            keep = max((k for k in range(1, len(OPEN)) if self._held.endswith(OPEN[:k])), default=0)
            out.append(self._held[: len(self._held) - keep])
            self._held = self._held[len(self._held) - keep :]
            return "".join(out), calls

    def flush(self) -> str:
        """What is still held (an unclosed block is returned as text)."""
        held = (OPEN if self._in_call else "") + self._held
        self._held, self._in_call = "", False
        return held


def check_tools(tools) -> tuple[dict, ...] | None:
    """OpenAI function tools, validated; ValueError naming what is wrong."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    clean = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        if not isinstance(function.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", function["name"]):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        entry = {"name": function["name"], "parameters": parameters}
        if isinstance(function.get("description"), str):
            entry["description"] = function["description"]
        clean.append({"type": "function", "function": entry})
    return tuple(clean) or None


def check_tool_choice(choice, tools: tuple[dict, ...] | None) -> str | None:
    """ "auto", "none", "required", or the one function's name a named choice forces; None without tools."""
    if choice is None:
        return "auto" if tools else None
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ValueError("tool_choice must be auto, none, required or {'type': 'function', 'function': {'name'}}")
        if name not in {t["function"]["name"] for t in tools or ()}:
            raise ValueError(f"tool_choice names {name!r}, which is not among tools")
        return name
    if choice not in ("auto", "none", "required"):
        raise ValueError(f"tool_choice must be auto, none, required or a named function, not {choice!r}")
    if choice != "none" and not tools:
        raise ValueError(f"tool_choice {choice!r} needs tools")
    return choice if tools else None


def call_schema(tools: tuple[dict, ...], choice: str) -> dict:
    """The JSON schema a forced call must match: one of the tools (``required``) or the named one."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if choice == "required" or t["function"]["name"] == choice
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}
