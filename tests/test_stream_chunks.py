"""Streamed chunks built from templates are the pydantic models' own bytes; a consumer that falls
behind the engine gets each choice's waiting outputs merged into one."""

from __future__ import annotations

import asyncio

import pytest

from athena_runtime.outputs import RequestOutput, TokenLogprob
from athena_runtime.sampling_params import SamplingParams
from server import errors
from server.metrics import ServerMetrics
from server.prompt_encoder import PromptEncoder
from server.protocol import ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice, CompletionResponse
from server.retry_after import RetryAfterEstimator
from server.serving import ChoiceState, ChoiceStreams, Job, ServingContext
from server.settings import ServerSettings
from server.stream_chunks import TextChunks, merge_outputs, sse_event
from tests.fake_engine import FakeEngine

TEXTS = [
    "",
    "hello",
    ' "quoted" \\ back/slash',
    "line\nbreak\r\ttab\b\f",
    "\x00\x01\x1f\x7f",
    "é ü — 日本語 😀",
    "\u2028\u2029",
    '{"a": [1, 2]}',
    "@@athena-text@@",
]


def completion_chunk(text: str, index: int = 3) -> CompletionResponse:
    return CompletionResponse(
        id="cmpl-1",
        created=1700000000,
        model="m/ä",
        choices=[CompletionChoice(index=index, text=text, finish_reason=None)],
    )


def chat_chunk(text: str, index: int = 0) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1",
        created=1700000000,
        model="m",
        choices=[ChatChunkChoice(index=index, delta=ChatDelta(content=text))],
    )


@pytest.mark.parametrize("build", [completion_chunk, chat_chunk])
@pytest.mark.parametrize("text", TEXTS)
def test_template_chunk_is_the_models_json(build, text):
    assert TextChunks(lambda t: build(t).model_dump_json()).chunk(text) == build(text).model_dump_json()


def test_template_needs_the_text_once():
    with pytest.raises(ValueError):
        TextChunks(lambda t: completion_chunk(t + t).model_dump_json())


def test_sse_event_is_what_sse_starlette_writes():
    from sse_starlette.event import ensure_bytes

    data = chat_chunk("a\nb").model_dump_json()
    assert sse_event(data) == ensure_bytes(data, "\n")


def test_merge_outputs_joins_text_tokens_and_logprobs_and_keeps_the_last_status():
    lp = lambda t: TokenLogprob(t, str(t), -1.0)  # noqa: E731
    a = RequestOutput("r", "ab", (1, 2), logprobs=(lp(1), lp(2)), prompt_tokens=5, completion_tokens=2)
    b = RequestOutput(
        "r", "c", (3,), finished=True, finish_reason="length", logprobs=(lp(3),), prompt_tokens=5, completion_tokens=3
    )
    m = merge_outputs(a, b)
    assert (m.text, m.token_ids, m.finished, m.finish_reason, m.completion_tokens) == (
        "abc",
        (1, 2, 3),
        True,
        "length",
        3,
    )
    assert [t.token_id for t in m.logprobs] == [1, 2, 3]
    assert merge_outputs(RequestOutput("r", "x", (1,)), RequestOutput("r", "y", (2,))).logprobs is None


def _context(engine: FakeEngine) -> ServingContext:
    return ServingContext(
        engine=engine,
        model_name="fake-model",
        settings=ServerSettings(api_key=None),
        metrics=ServerMetrics(lambda: None),
        encoder=PromptEncoder(engine.tokenizer, 256),
        max_choices=8,
        retry_after=RetryAfterEstimator(1, 60),
    )


@pytest.mark.parametrize("lag_s", [0.0, 0.3])
def test_a_lagging_consumer_gets_merged_outputs_with_the_same_text(lag_s):
    async def run() -> tuple[list[ChoiceState], int]:
        engine = FakeEngine(step_delay_s=0.0)
        await engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        jobs = [Job(i, f"r{i}", [5, 6, 7], params) for i in range(2)]
        streams = ChoiceStreams(_context(engine), jobs, 0.0)
        await streams.start()
        await asyncio.sleep(lag_s)  # the engine runs ahead of this consumer
        states, seen = [ChoiceState() for _ in jobs], 0
        async for i, out in streams.outputs():
            states[i].add(out)
            seen += 1
        return states, seen

    states, seen = asyncio.run(run())
    for s in states:
        assert s.finish_reason == "length" and s.token_count == 24 and s.text
    if lag_s:
        assert seen <= 4  # each choice's waiting outputs came as one (plus what came before the lag)
    else:
        assert seen > 4


def test_merged_and_unmerged_texts_match():
    async def run(lag_s: float) -> list[str]:
        engine = FakeEngine(step_delay_s=0.0)
        await engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        streams = ChoiceStreams(_context(engine), [Job(0, "r", [9, 8, 7], params)], 0.0)
        await streams.start()
        await asyncio.sleep(lag_s)
        return [(await streams.collect())[0].text]

    assert asyncio.run(run(0.0)) == asyncio.run(run(0.3))


def test_outputs_before_a_failure_are_sent_before_its_error():
    async def run() -> tuple[list[str], BaseException | None]:
        engine = FakeEngine(step_delay_s=0.0)
        engine.error_after_tokens = 10
        await engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        streams = ChoiceStreams(_context(engine), [Job(0, "r", [5, 6, 7], params)], 0.0)
        await streams.start()
        await asyncio.sleep(0.3)  # the tokens and the error output are all waiting
        texts, error = [], None
        try:
            async for _, out in streams.outputs():
                texts.append(out.text)
        except errors.APIError as exc:
            error = exc
        return texts, error

    async def first_ten() -> str:
        engine = FakeEngine(step_delay_s=0.0)
        await engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        streams = ChoiceStreams(_context(engine), [Job(0, "r", [5, 6, 7], params)], 0.0)
        await streams.start()
        return (await streams.collect())[0].text

    texts, error = asyncio.run(run())
    assert error is not None and error.status == 500
    assert "".join(texts) == asyncio.run(first_ten()) and len(texts) <= 2  # the 10 tokens' text, then the error
