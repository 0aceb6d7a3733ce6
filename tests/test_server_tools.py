"""Tool calls and structured-output requests through the server (fake engine replaying each model
family's tool-call output; real uvicorn; the official openai client), history rendering per family
and the generic prompt, and the 400s of what cannot be honoured."""

from __future__ import annotations

import copy
import json

import httpx
import openai
import pytest
from fake_engine import FakeEngine, tiny_chat_tokenizer
from server_fixtures import serve_engine

from server.protocol import ChatCompletionRequest
from server.tools import GENERIC_TOOLS_PROMPT, plan_tools, render_prompt

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "Weather in Paris?"}]

# Minimal templates written for these tests, each rendering tools the way its family does.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n"
    '</tools>\nFor each call return <tool_call>\n{"name": <function-name>, "arguments": <args>}\n</tool_call>'
    "<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    '{%- for c in m.tool_calls %}<tool_call>\n{"name": "{{ c.function.name }}", "arguments": '
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
LLAMA_TEMPLATE = (
    "{%- for m in messages %}<|start|>{{ 'ipython' if m.role == 'tool' else m.role }}\n"
    "{%- if loop.last and tools %}Given the following functions, respond with a JSON for a function call "
    'in the format {"name": function name, "parameters": dictionary of argument name and its value}.\n'
    "{%- for t in tools %}{{ t | tojson }}\n{%- endfor %}{%- endif %}"
    '{%- if m.tool_calls %}{%- for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": '
    "{{ c.function.arguments | tojson }}}{%- endfor %}{%- else %}{{ m.content }}{%- endif %}<|end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|start|>assistant\n{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if loop.index0 == ns.last and tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}"
    "[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- if m.role == 'user' %}[INST] {{ m.content }}[/INST]"
    '{%- elif m.role == \'tool\' %}[TOOL_RESULTS] {"content": {{ m.content | tojson }}, "call_id": '
    '"{{ m.tool_call_id }}"}[/TOOL_RESULTS]'
    '{%- elif m.tool_calls %}[TOOL_CALLS] [{%- for c in m.tool_calls %}{"name": "{{ c.function.name }}", '
    '"arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}{%- endfor %}]</s>'
    "{%- else %}{{ m.content }}</s>{%- endif %}{%- endfor %}"
)

FAMILIES = {
    "hermes": (
        HERMES_TEMPLATE,
        'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        "I will check.",
    ),
    "llama3_json": (
        LLAMA_TEMPLATE,
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
    ),
    "mistral": (
        MISTRAL_TEMPLATE,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        None,
    ),
}


def _tokenizer(template: str | None, special: tuple[str, ...] = ()):
    tok = copy.deepcopy(tiny_chat_tokenizer())
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture
def family_server(request):
    family, special = request.param
    template, reply, content = FAMILIES[family]
    engine = FakeEngine(step_delay_s=0.0005, max_model_len=4096)
    engine.tokenizer = _tokenizer(template, special)
    server = serve_engine(engine)
    yield server, engine, reply, content
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def _stream_calls(chunks) -> tuple[str, list[dict], str | None, list]:
    content, calls, finish, firsts = "", {}, None, []
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                firsts.append(d)
                assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, firsts


@pytest.mark.parametrize(
    "family_server",
    [("hermes", ()), ("llama3_json", ()), ("mistral", ()), ("mistral", ("[TOOL_CALLS]",))],
    indirect=True,
    ids=["hermes", "llama3_json", "mistral", "mistral_special_marker"],
)
def test_auto_parses_each_familys_output_streaming_and_not(family_server):
    server, engine, reply, content = family_server
    with _client(server) as client:
        engine.replies.append(reply)
        r = client.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, max_tokens=200)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == content
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
        engine.replies.append(reply)
        got_content, calls, finish, _ = _stream_calls(
            client.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, max_tokens=200, stream=True)
        )
        assert finish == "tool_calls" and (got_content or None) == content
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Paris", "unit": "celsius"})
        ]
    # the template rendered the tools itself
    prompt = engine.tokenizer.decode(engine.prompts[-1])
    assert "get_weather" in prompt and "# Tools\n\nYou can call functions" not in prompt


@pytest.mark.parametrize("family_server", [("hermes", ())], indirect=True)
def test_auto_plain_answers_and_tool_choice_none(family_server):
    server, engine, _, _ = family_server
    with _client(server) as client:
        engine.replies.append("Paris is sunny <today>.")
        r = client.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, max_tokens=50)
        assert r.choices[0].message.content == "Paris is sunny <today>." and r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.tool_calls is None
        engine.replies.append('<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>')
        r = client.chat.completions.create(
            model="fake-model", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=50
        )
        assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content
        assert "get_weather" not in engine.tokenizer.decode(engine.prompts[-1])  # none: tools not shown


def test_parallel_calls_and_parallel_false():
    engine = FakeEngine(step_delay_s=0.0005, max_model_len=4096)
    engine.tokenizer = _tokenizer(HERMES_TEMPLATE)
    two = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
    )
    server = serve_engine(engine)
    try:
        with _client(server) as client:
            engine.replies.append(two)
            r = client.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, max_tokens=200)
            assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather", "get_time"]
            assert len({c.id for c in r.choices[0].message.tool_calls}) == 2
            engine.replies.append(two)
            _, calls, finish, firsts = _stream_calls(
                client.chat.completions.create(
                    model="fake-model", messages=ASK, tools=TOOLS, max_tokens=200, stream=True
                )
            )
            assert [c["name"] for c in calls] == ["get_weather", "get_time"] and [f.index for f in firsts] == [0, 1]
            engine.replies.append(two)
            r = client.chat.completions.create(
                model="fake-model", messages=ASK, tools=TOOLS, max_tokens=200, parallel_tool_calls=False
            )
            assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    finally:
        server.stop()


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "abcDEF123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "21 C, sunny"},
]


@pytest.mark.parametrize("family", ["hermes", "llama3_json", "mistral"])
def test_history_with_calls_and_results_renders_through_the_native_template(family):
    tok = _tokenizer(FAMILIES[family][0])
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY, "tools": TOOLS})
    plan = plan_tools(req, tok)
    assert plan.native and plan.syntax.name == family and plan.mode == "auto"
    prompt = render_prompt(req, tok, plan)
    assert "21 C, sunny" in prompt and '"city": "Paris"' in prompt and "get_time" in prompt
    assert GENERIC_TOOLS_PROMPT[:20] not in prompt


def test_generic_prompt_for_a_template_without_tools():
    tok = _tokenizer(None)  # ChatML that knows nothing of tools
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": HISTORY + [{"role": "tool", "tool_call_id": "x", "content": "second result"}],
            "tools": TOOLS,
            "tool_choice": "required",
        }
    )
    plan = plan_tools(req, tok)
    assert not plan.native and plan.syntax.name == "hermes"
    prompt = render_prompt(req, tok, plan)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and json.dumps(WEATHER_TOOL) in system
    assert "Answer now with a call to one of the functions." in system
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in prompt
    )
    assert (
        "<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response>\n<tool_response>\nsecond result\n"
        "</tool_response><|im_end|>" in prompt
    )


@pytest.fixture(scope="module")
def http():
    engine = FakeEngine(max_model_len=4096)
    server = serve_engine(engine)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    server.stop()


CHAT = {"model": "fake-model", "messages": ASK, "max_tokens": 5}


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"tool_choice": "required"}, "tool_choice", "needs at least one tool"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not in 'tools'",
        ),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools", "distinct"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.[0].function.name", "pattern"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "together with tools"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a 'json_schema'"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "s",
                        "schema": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                    },
                }
            },
            "response_format.json_schema.schema",
            "uniqueItems at #/uniqueItems",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "s",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"not": {"type": "string"}}, "b": {"oneOf": [{"type": "integer"}]}},
                        },
                    },
                }
            },
            "response_format.json_schema.schema",
            "not at #/properties/a/not; oneOf (use anyOf) at #/properties/b/oneOf",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "strange"}}}},
            "response_format.json_schema.schema",
            "Invalid JSON schema",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"x": {"type": "string", "nullable": True}}},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools.[0].function.parameters",
            "nullable",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
            "messages.[0].tool_calls.[0].function",
            "required",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                    }
                ]
            },
            "messages.[0]",
            "only assistant",
        ),
        ({"logit_bias": {"100000": 5}}, "logit_bias", "token ids must be in"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(http, change, param, words):
    r = http.post("/v1/chat/completions", json={**CHAT, **change})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_structured_and_biased_requests_are_accepted_with_the_fake_engine(http):
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "name": "s",
            "strict": True,
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        },
    }
    for body in (
        {**CHAT, "response_format": fmt},
        {**CHAT, "response_format": {"type": "json_object"}},
        {**CHAT, "logit_bias": {"5": -100, "6": 100}},
        {"model": "fake-model", "prompt": "Hi", "max_tokens": 3, "response_format": fmt},
    ):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        assert http.post(path, json=body).status_code == 200
