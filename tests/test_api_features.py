"""What client libraries expect of /v1, through the official openai client against a running app: health and
metrics, structured output, tool calls, logprobs, /v1/completions, unknown fields refused by name."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jsonschema
import openai
import pytest

import app
from llm_backends import load_model
from llm_backends import tools as tool_calls
from llm_backends.serving import ModelRegistry
from llm_backends.session_cache import common_prefix_len
from test_app import free_port

KEY = "feature-key"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def api(qwen3_dir, gemma3_dir):
    registry = ModelRegistry([str(qwen3_dir), str(gemma3_dir)], max_cache_bytes=2**28)
    registry.switch(registry.ids[0])
    config = app.AppConfig(port=free_port(), api_keys=[KEY], concurrency=4)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{config.port}", registry
    demo.close()


@pytest.fixture()
def client(api):
    return openai.OpenAI(base_url=f"{api[0]}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(params=[0, 1], ids=["qwen3-template-tools", "gemma3-prompt-format"])
def model_id(request, api):
    return api[1].ids[request.param]


# --- health and metrics --------------------------------------------------------------------------------------


def test_health_is_public_and_says_only_whether_a_model_is_ready(api):
    base, registry = api
    r = httpx.get(f"{base}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    registry.loading = registry.ids[1]
    try:
        r = httpx.get(f"{base}/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
    finally:
        registry.loading = None


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_count_requests_tokens_and_cache_hits_behind_the_key(api, client):
    base, registry = api
    assert httpx.get(f"{base}/metrics").status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(f"{base}/metrics", headers=auth).text
    first = client.chat.completions.create(
        model=registry.ids[0], messages=ASK, max_tokens=4, temperature=0, user="metrics", extra_body=NO_THINKING
    )
    messages = [*ASK, {"role": "assistant", "content": first.choices[0].message.content}]
    messages.append({"role": "user", "content": "And tomorrow?"})
    client.chat.completions.create(
        model=registry.ids[0], messages=messages, max_tokens=4, temperature=0, user="metrics", extra_body=NO_THINKING
    )
    r = httpx.get(f"{base}/metrics", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    grew = {
        name: metric(after, name) - metric(before, name)
        for name in (
            'llm_replies_total{door="/v1/chat",finish="length"}',
            "llm_prompt_tokens_total",
            "llm_completion_tokens_total",
            'llm_cached_tokens_total{tier="memory"}',
            'llm_cache_hits_total{tier="memory"}',
            "llm_time_to_first_token_seconds_count",
            "llm_decode_tokens_per_second_count",
        )
    }
    assert grew['llm_replies_total{door="/v1/chat",finish="length"}'] == 2
    assert grew["llm_completion_tokens_total"] == 8 and grew["llm_prompt_tokens_total"] > 20
    assert grew['llm_cached_tokens_total{tier="memory"}'] > 0 and grew['llm_cache_hits_total{tier="memory"}'] == 1
    assert grew["llm_time_to_first_token_seconds_count"] == 2 and grew["llm_decode_tokens_per_second_count"] == 2
    assert metric(after, 'llm_cache_bytes{tier="memory"}') > 0 and metric(after, "llm_active_streams") == 0
    assert KEY not in after


# --- structured output ---------------------------------------------------------------------------------------


def test_json_schema_output_parses_and_validates_even_from_a_random_model(client, model_id):
    for stream in (False, True):
        kwargs = dict(
            model=model_id,
            messages=ASK,
            max_tokens=120,
            temperature=0.8,
            seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            extra_body=NO_THINKING,
        )
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            out = client.chat.completions.create(**kwargs)
            text, finish = out.choices[0].message.content, [out.choices[0].finish_reason]
        assert finish == ["stop"], text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_thinking_first_then_the_schema(client, api):
    qwen = api[1].ids[0]
    out = client.chat.completions.create(
        model=qwen,
        messages=ASK,
        max_tokens=160,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        # The budget makes the tiny model close its reasoning; a reply may not end inside it.
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "thinking_budget": 24},
    )
    assert out.choices[0].message.model_extra.get("reasoning_content"), "reasoning stays free"
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)


def test_a_reply_that_must_follow_a_schema_cannot_end_inside_its_reasoning(qwen3):
    import torch

    grammar = qwen3.grammars.for_request({"type": "json_object"}, None, None)
    constraint = qwen3.grammars.constraint(grammar, wait_for=qwen3.think_ids[1])
    logits = torch.zeros(qwen3.grammars.vocab_size)
    masked = constraint.mask(logits)
    stops = sorted(i for i in qwen3.stop_ids if i < len(logits))
    assert stops and torch.isinf(masked[stops]).all()
    assert (masked[[i for i in range(len(logits)) if i not in stops]] == 0).all(), "reasoning is otherwise free"


def test_a_schema_that_cannot_be_compiled_is_a_400(client, api):
    bad_schemas = [
        {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}},
        {"type": "wizard"},
    ]
    for schema in bad_schemas:
        with pytest.raises(openai.BadRequestError, match="schema"):
            client.chat.completions.create(
                model=api[1].ids[0],
                messages=ASK,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            )
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=api[1].ids[0], messages=ASK, response_format={"type": "xml"})


# --- tool calls ----------------------------------------------------------------------------------------------


def check_call(call, tools: dict) -> None:
    assert call.type == "function" and call.id
    schema = tools[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_forced_tool_calls_are_valid_for_their_schemas(client, model_id):
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        out = client.chat.completions.create(
            model=model_id,
            messages=ASK,
            max_tokens=120,
            temperature=0,
            tools=list(tools.values()),
            tool_choice=choice,
            extra_body=NO_THINKING,
        )
        assert out.choices[0].finish_reason == "tool_calls", out
        (call,) = out.choices[0].message.tool_calls
        check_call(call, tools)
        if isinstance(choice, dict):
            assert call.function.name == "get_time"


def test_streamed_tool_calls_and_the_round_trip_with_cache_reuse(client, model_id, api):
    registry = api[1]
    tools = [WEATHER]
    kwargs = dict(model=model_id, temperature=0, max_tokens=120, tools=tools, user=f"tools-{model_id}")
    chunks = list(
        client.chat.completions.create(
            messages=ASK, tool_choice="required", stream=True, extra_body=NO_THINKING, **kwargs
        )
    )
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    check_call(calls[0], {"get_weather": WEATHER})
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    call = calls[0]
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    out = client.chat.completions.create(messages=messages, extra_body=NO_THINKING, **kwargs)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    model = registry.get()
    first = model.render(ASK, enable_thinking=False, tools=tools)
    second = model.render(model.request(messages).messages, enable_thinking=False, tools=tools)
    shared = common_prefix_len(first, second)
    assert shared > 0.9 * len(first)
    assert out.usage.prompt_tokens_details.cached_tokens >= shared, "the round trip reuses what the template keeps"


def test_tool_choice_none_keeps_the_prompt_and_parses_no_call(client, api):
    model = api[1].ids[0]
    kwargs = dict(model=model, messages=ASK, max_tokens=1, tools=[WEATHER], extra_body=NO_THINKING)
    plain = client.chat.completions.create(model=model, messages=ASK, max_tokens=1, extra_body=NO_THINKING)
    auto = client.chat.completions.create(**kwargs)
    none = client.chat.completions.create(tool_choice="none", **kwargs)
    assert none.usage.prompt_tokens == auto.usage.prompt_tokens > plain.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None


def test_tool_call_blocks_are_parsed_from_text_whole_and_streamed():
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
    text = f"Let me look.\n<tool_call>\n{call}\n</tool_call>"
    rest, calls = tool_calls.parse(text)
    assert rest == "Let me look." and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "c"}
    splitter, shown, found = tool_calls.StreamingCalls(), [], []
    for piece in [text[i : i + 3] for i in range(0, len(text), 3)]:
        out, new = splitter.push(piece)
        shown.append(out)
        found += new
    assert "".join(shown) + splitter.flush() == "Let me look.\n" and [c.name for c in found] == ["get_weather"]
    assert tool_calls.parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert tool_calls.parse('<tool_call>{"name": 3}</tool_call>')[1] == []


def test_bad_tools_are_400s(client, api):
    model = api[1].ids[0]
    cases = [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "name"),
    ]
    for fields, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model=model, messages=ASK, **fields)


# --- logprobs and /v1/completions ----------------------------------------------------------------------------


def test_logprobs_whole_and_streamed(client, model_id):
    kwargs = dict(model=model_id, messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    out = client.chat.completions.create(extra_body=NO_THINKING, **kwargs)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens - (out.choices[0].finish_reason == "stop")
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob), "greedy picks the likeliest"
        assert bytes(entry.bytes).decode(errors="replace") == entry.token, "bytes are the token's own"
    streamed = list(client.chat.completions.create(stream=True, extra_body=NO_THINKING, **kwargs))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(**{**kwargs, "top_logprobs": 21})


def test_completions_for_raw_prompts(client, model_id):
    kwargs = dict(model=model_id, prompt="The capital of France is", max_tokens=12, temperature=0, logprobs=3)
    out = client.completions.create(**kwargs)
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.finish_reason == "length" and out.usage.completion_tokens == 12
    assert len(choice.logprobs.tokens) == 12 and all(len(top) <= 3 for top in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens).replace("\ufffd", "") in choice.text or choice.text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 12
    stop_at = choice.text.strip()[:2]
    if stop_at:
        stopped = client.completions.create(**{**kwargs, "stop": [stop_at]})
        assert stop_at not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_completions_reuse_a_users_cache(client, api):
    model = api[1].ids[0]
    first = client.completions.create(model=model, prompt="Tell me about the sea.", max_tokens=4, user="c1")
    again = client.completions.create(
        model=model, prompt="Tell me about the sea." + first.choices[0].text + " And", max_tokens=4, user="c1"
    )
    assert again.usage.prompt_tokens_details.cached_tokens > 0


# --- every field honoured or refused by name ----------------------------------------------------------------


def test_unknown_fields_are_refused_by_name_and_hints_are_accepted(client, api):
    model = api[1].ids[0]
    for field in ("frobnicate", "session_id", "modalities"):
        with pytest.raises(openai.BadRequestError, match=field):
            client.chat.completions.create(model=model, messages=ASK, max_tokens=1, extra_body={field: 1})
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=model, prompt="x", max_tokens=1, best_of=2)
    out = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=1, metadata={"run": "x"}, store=False, parallel_tool_calls=True
    )
    assert out.choices[0].message is not None


def test_the_python_surface_takes_the_same_fields(qwen3):
    out = qwen3.create(
        ASK,
        max_tokens=120,
        temperature=0,
        enable_thinking=False,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        logprobs=True,
        top_logprobs=2,
    )
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), PERSON)
    assert out["choices"][0]["logprobs"]["content"]
    called = qwen3.create(
        ASK, max_tokens=120, temperature=0, tools=[WEATHER], tool_choice="required", enable_thinking=False
    )
    assert called["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    text = qwen3.create_completion("Once upon a time", max_tokens=5, temperature=0)
    assert text["object"] == "text_completion" and text["usage"]["completion_tokens"] == 5
    with pytest.raises(ValueError, match="unsupported field"):
        qwen3.create(ASK, frobnicate=True)


# --- the embedded model, MLX, a remote upstream --------------------------------------------------------------


@pytest.mark.embedded
def test_the_embedded_base_model_gives_valid_json_and_valid_forced_calls(embedded):
    registry = ModelRegistry([None], max_cache_bytes=2**28)
    registry.model, registry.current_id = embedded, registry.ids[0]
    config = app.AppConfig(port=free_port())
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{config.port}/v1", api_key="x", max_retries=0)
        short = client.chat.completions.create(model="gemma-3-270m", messages=ASK, max_tokens=1)
        assert short.model == "gemma-3-270m (embedded)", "the short id names the embedded model"
        assert client.chat.completions.create(model="default", messages=ASK, max_tokens=1).choices
        person = client.chat.completions.create(
            model=registry.ids[0],
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            max_tokens=80,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        )
        assert person.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(person.choices[0].message.content), PERSON)
        anything = client.chat.completions.create(
            model=registry.ids[0], messages=ASK, max_tokens=80, temperature=0, response_format={"type": "json_object"}
        )
        if anything.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(anything.choices[0].message.content), dict)
        called = client.chat.completions.create(
            model=registry.ids[0],
            messages=ASK,
            max_tokens=80,
            temperature=0,
            tools=[WEATHER, TIME],
            tool_choice="required",
        )
        (call,) = called.choices[0].message.tool_calls
        check_call(call, {"get_weather": WEATHER, "get_time": TIME})
    finally:
        demo.close()


class FeatureUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream that answers with tool calls (streamed in fragments) and logprobs."""

    bodies: list = []

    def log_message(self, *args):
        pass

    def _send(self, payload: bytes, kind="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self._send(json.dumps({"data": [{"id": "up"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FeatureUpstream.bodies.append((self.path, body))
        lp = {"content": [{"token": "ok", "logprob": -0.5, "top_logprobs": [{"token": "ok", "logprob": -0.5}]}]}
        if self.path.endswith("/completions") and "prompt" in body:
            choice = {"text": " Paris", "finish_reason": "length", "index": 0}
            choice["logprobs"] = {"tokens": [" Paris"], "token_logprobs": [-0.1], "top_logprobs": [{" Paris": -0.1}]}
            self._send(
                json.dumps({"choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}).encode()
            )
            return
        if not body.get("stream"):
            call = {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            reply = {"choices": [{"message": message, "finish_reason": "tool_calls", "logprobs": lp}]}
            self._send(json.dumps({**reply, "usage": {"prompt_tokens": 9, "completion_tokens": 7}}).encode())
            return
        pieces = [{"index": 0, "id": "c1", "function": {"name": "get_weather", "arguments": ""}}]
        pieces += [{"index": 0, "function": {"arguments": part}} for part in ('{"city"', ': "Oslo"}')]
        events = [{"choices": [{"delta": {"tool_calls": [p]}, "finish_reason": None}]} for p in pieces]
        events.append({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
        self._send(("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode())


def test_the_remote_backend_passes_the_fields_on_and_brings_calls_and_logprobs_back():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FeatureUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FeatureUpstream.bodies = []
    try:
        model = load_model(f"openai:http://127.0.0.1:{server.server_address[1]}/v1#up")
        fields = dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
        out = model.create(ASK, logprobs=True, top_logprobs=1, response_format={"type": "json_object"}, **fields)
        (call,) = out["choices"][0]["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
        assert out["choices"][0]["finish_reason"] == "tool_calls" and out["usage"]["prompt_tokens"] == 9
        assert out["choices"][0]["logprobs"]["content"][0]["token"] == "ok"
        events = list(model.create(ASK, stream=True, **fields))
        streamed = [t for e in events if e["choices"] for t in e["choices"][0]["delta"].get("tool_calls", [])]
        assert [t["function"] for t in streamed] == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
        text = model.create_completion("The capital of France is", max_tokens=1, logprobs=1)
        assert text["choices"][0]["text"] == " Paris" and text["choices"][0]["logprobs"]["tokens"] == [" Paris"]
        (path1, whole), (_, stream), (path3, raw) = FeatureUpstream.bodies
        assert path1.endswith("/chat/completions") and path3.endswith("/completions")
        assert whole["tools"][0]["function"]["name"] == "get_weather" and whole["tool_choice"]["function"]
        assert whole["logprobs"] is True and whole["top_logprobs"] == 1
        assert whole["response_format"] == {"type": "json_object"} and stream["stream"] is True
        assert raw["prompt"] == "The capital of France is" and raw["logprobs"] == 1 and "messages" not in raw
    finally:
        server.shutdown()


def test_completions_keep_leading_newlines_and_errors_name_their_field(client, api, qwen3):
    from llm_backends.text_stream import ReplyText

    ids = qwen3.tokenizer("\n    return 1", add_special_tokens=False)["input_ids"]
    for raw, expected in ((True, "\n    return 1"), (False, "    return 1")):
        reply = ReplyText(qwen3.tokenizer, think_ids=None, thinking=False, stop=(), raw=raw)
        text = "".join(reply.push(i)[0] for i in ids) + reply.flush()[0]
        assert text == expected, "a raw continuation keeps every character; a chat answer drops leading newlines"
    model = api[1].ids[0]
    cases = [
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"chat_template_kwargs": {"tools_in_user": True}}, "chat_template_kwargs"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=model, messages=ASK, extra_body=fields)
        assert error.value.body["param"] == param, (fields, error.value.body)
    with pytest.raises(openai.BadRequestError, match="logprobs must be an integer from 0 to 20"):
        client.completions.create(model=model, prompt="x", logprobs=50)


class StallingUpstream(BaseHTTPRequestHandler):
    """Starts streaming at once, then stalls for 5 s before its next event."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        FeatureUpstream.do_GET(self)

    def _send(self, payload: bytes, kind="application/json"):
        FeatureUpstream._send(self, payload, kind)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        first = {"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}
        self.wfile.write(f"data: {json.dumps(first)}\n\n".encode())
        self.wfile.flush()
        time.sleep(5)


def test_closing_a_streamed_remote_reply_ends_it_while_the_upstream_stalls():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StallingUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        model = load_model(f"openai:http://127.0.0.1:{server.server_address[1]}/v1#up")
        chat = model.stream(model.request(ASK))
        assert next(chat).text == "Hi"
        seen = []
        reader = threading.Thread(target=lambda: seen.extend(chat))
        reader.start()
        time.sleep(0.3)
        started = time.perf_counter()
        chat.close()
        reader.join(3)
        assert not reader.is_alive() and time.perf_counter() - started < 2, "closed at once, not after 5 s"
        assert [c.finish_reason for c in seen] in ([], ["cancelled"])
    finally:
        server.shutdown()
