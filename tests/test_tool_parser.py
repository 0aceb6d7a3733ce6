"""Tool-call parsing of each family's output format, fed whole and in pieces; family detection and
forced-call grammars of each family."""

from __future__ import annotations

import json
import random

import pytest

from server.tool_parser import ArgumentsDelta, CallStart, ContentDelta, ToolCallParser, new_call_id, read_region
from server.tool_syntax import HERMES, LLAMA3_JSON, MISTRAL, detect_syntax, template_takes_tools

FUNCTIONS = frozenset({"get_weather", "get_time"})
WEATHER = {"city": "Paris", "unit": "celsius"}

# What each family's models write (formats from their chat templates' instructions and history rendering).
OUTPUTS = {
    "hermes_one": (
        HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        "",
        [("get_weather", WEATHER)],
    ),
    "hermes_two_with_text": (
        HERMES,
        'Let me look both up.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": '
        '"get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        "Let me look both up.",
        [("get_weather", WEATHER), ("get_time", {"tz": "Europe/Paris"})],
    ),
    "hermes_plain": (
        HERMES,
        "The weather in Paris is sunny, 21 degrees.",
        "The weather in Paris is sunny, 21 degrees.",
        [],
    ),
    "hermes_undeclared": (
        HERMES,
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',
        [],
    ),
    "hermes_broken_json": (
        HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
        [],
    ),
    "llama_bare": (
        LLAMA3_JSON,
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        "",
        [("get_weather", WEATHER)],
    ),
    "llama_python_tag": (
        LLAMA3_JSON,
        '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}',
        "",
        [("get_time", {"tz": "UTC"})],
    ),
    "llama_json_answer": (LLAMA3_JSON, '{"answer": 42}', '{"answer": 42}', []),
    "llama_plain": (LLAMA3_JSON, "Paris is the capital of France.", "Paris is the capital of France.", []),
    "mistral_marker": (
        MISTRAL,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
        '"celsius"}}, {"name": "get_time", "arguments": {"tz": "CET"}}]',
        "",
        [("get_weather", WEATHER), ("get_time", {"tz": "CET"})],
    ),
    "mistral_marker_dropped": (
        MISTRAL,
        ' [{"name": "get_time", "arguments": {"tz": "CET"}}]',
        "",
        [("get_time", {"tz": "CET"})],
    ),
    "mistral_plain": (MISTRAL, "It is sunny [citation needed].", "It is sunny [citation needed].", []),
}


def _run(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[tuple[str, str, str]], list]:
    events = []
    for p in pieces:
        events += parser.feed(p)
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, list] = {}
    for e in events:
        if isinstance(e, CallStart):
            assert e.index not in calls
            calls[e.index] = [e.id, e.name, ""]
        elif isinstance(e, ArgumentsDelta):
            calls[e.index][2] += e.text
    return content, [tuple(calls[i]) for i in sorted(calls)], events


def _pieces(text: str, seed: int) -> list[str]:
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i : i + n])
        i += n
    return out


@pytest.mark.parametrize(
    "case, incremental",
    [(case, False) for case in sorted(OUTPUTS)] + [(case, True) for case in sorted(OUTPUTS) if OUTPUTS[case][3]],
)  # incremental: forced, well-formed calls only
def test_outputs_parse_the_same_whole_or_in_pieces(case, incremental):
    syntax, text, content, expected = OUTPUTS[case]
    results = []
    for pieces in ([text], list(text), _pieces(text, 1), _pieces(text, 2)):
        parser = ToolCallParser(syntax, FUNCTIONS, incremental=incremental)
        got_content, calls, events = _run(parser, pieces)
        assert got_content.strip() == content
        assert [(name, json.loads(args)) for _, name, args in calls] == expected
        assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == expected
        assert all(cid.startswith("call_") or len(cid) == 9 for cid, _, _ in calls)
        results.append(([(n, a) for _, n, a in calls], got_content.strip()))
        if incremental and len(pieces) > 1:  # arguments arrive in several pieces, after their start
            starts = [i for i, e in enumerate(events) if isinstance(e, CallStart)]
            first_args = [i for i, e in enumerate(events) if isinstance(e, ArgumentsDelta)]
            assert starts and first_args and starts[0] < first_args[0]
            assert len(first_args) > len(starts)
    assert all(r == results[0] for r in results)


def test_special_marker_tokens_are_put_back_by_id():
    parser = ToolCallParser(MISTRAL, FUNCTIONS, incremental=False, marker_ids={7: "[TOOL_CALLS]"})
    events = parser.feed("", (7,)) + parser.feed(' [{"name": "get_time", "arguments": {}}]') + parser.finish()
    assert [type(e) for e in events] == [CallStart, ArgumentsDelta] and parser.calls[0].arguments == "{}"


def test_parallel_false_keeps_the_first_call():
    syntax, text, _, _ = OUTPUTS["hermes_two_with_text"]
    for incremental in (False, True):
        parser = ToolCallParser(syntax, FUNCTIONS, incremental=incremental, max_calls=1)
        _, calls, _ = _run(parser, _pieces(text, 3))
        assert [c[1] for c in calls] == ["get_weather"] and len(parser.calls) == 1


def test_quoted_arguments_are_unwrapped():
    parser = ToolCallParser(HERMES, FUNCTIONS, incremental=False)
    _, calls, _ = _run(parser, ['<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>'])
    assert json.loads(calls[0][2]) == {"tz": "UTC"}


def test_region_reader_reports_partial_calls():
    calls, complete = read_region(HERMES, '{"name": "get_weather", "arguments": {"city": "Pa')
    assert not complete and calls[0].name == "get_weather" and calls[0].arguments == '{"city": "Pa'
    calls, complete = read_region(MISTRAL, '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]')
    assert complete and [c.name for c in calls] == ["a", "b"] and all(c.done for c in calls)


def test_call_ids():
    assert new_call_id(HERMES).startswith("call_") and len(new_call_id(HERMES)) == 29
    mid = new_call_id(MISTRAL)
    assert len(mid) == 9 and mid.isalnum()


TEMPLATES = {
    "hermes": "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> reply with "
    "<tool_call>{...}</tool_call>{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "llama3_json": '{% if tools %}Respond with {"name": function name, "parameters": dict}.{% endif %}'
    "{% for m in messages %}{% if m.role == 'tool' %}ipython{% endif %}{{ m.content }}{% endfor %}",
    "mistral": "{% for m in messages %}{% if tools and loop.last %}[AVAILABLE_TOOLS]{{ tools | tojson }}"
    "[/AVAILABLE_TOOLS]{% endif %}{{ m.content }}{% endfor %}",
    None: "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}",
}


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_family_detection_from_the_template(family):
    syntax = detect_syntax(TEMPLATES[family])
    assert (syntax.name if syntax else None) == family
    assert template_takes_tools(TEMPLATES[family]) == (family is not None)
    assert not template_takes_tools("{{ 'tools are great' }}")


@pytest.mark.parametrize("syntax", [HERMES, LLAMA3_JSON, MISTRAL])
def test_forced_call_grammars_accept_their_format_and_parse_back(syntax):
    """The grammar each family forces accepts that family's canonical call, rejects a call that breaks
    the parameters' schema, and the parser reads the forced output back."""
    from fake_engine import tiny_chat_tokenizer

    from athena_runtime.grammar import Grammars

    tok = tiny_chat_tokenizer()
    grammars = Grammars(tok, [tok.eos_token_id], mask_threads=1)
    params = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    structure = syntax.structure(
        [("get_weather", params), ("get_time", {"type": "object", "properties": {}})], parallel=True
    )
    grammar = grammars.structural_tag(structure)
    call = syntax.call_prefix("get_weather") + '{"city": "Paris"}}'
    text = {"hermes": f"<tool_call>\n{call}\n</tool_call>", "llama3_json": call, "mistral": f"[TOOL_CALLS] [{call}]"}[
        syntax.name
    ]

    def accepts(t: str) -> bool:
        state = grammar.new()
        return all(state.accept(i) for i in tok.encode(t)) and state.matcher.is_completed()

    assert accepts(text)
    assert not accepts(text.replace('"Paris"', "12"))
    assert not accepts(text.replace("get_weather", "get_wether"))
    parser = ToolCallParser(syntax, FUNCTIONS, incremental=True)
    _, calls, _ = _run(parser, _pieces(text, 5))
    assert [(n, json.loads(a)) for _, n, a in calls] == [("get_weather", {"city": "Paris"})]
