"""POST /v1/chat/completions: messages -> chat template -> n generations -> response or SSE chunks.

A JSON response_format or a forced tool choice puts a grammar on every choice (structured.py,
tools.py); with tools, each choice's text goes through a tool-call parser (tool_parser.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

from sse_starlette import EventSourceResponse
from starlette.responses import Response

from athena_runtime.outputs import TokenLogprob
from server import errors
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    TokenLogprobEntry,
    TopLogprobEntry,
    Usage,
    finite_logprob,
)
from server.protocol_structured import DeltaFunctionCall, DeltaToolCall, ResponseToolCall
from server.serving import ChoiceState, ChoiceStreams, Job, ServingContext, new_id, sampling_params, total_usage
from server.stream_chunks import TextChunks, sse_event
from server.tool_parser import ArgumentsDelta, CallStart, ContentDelta, Event, ToolCallParser
from server.tools import ToolPlan, finish_reason, forced_call_grammar, plan_tools, render_prompt, response_calls

log = logging.getLogger("athena.server")


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            TokenLogprobEntry(
                token=t.token,
                logprob=finite_logprob(t.logprob),
                bytes=list(t.token.encode("utf-8")),
                top_logprobs=[
                    TopLogprobEntry(
                        token=a.token, logprob=finite_logprob(a.logprob), bytes=list(a.token.encode("utf-8"))
                    )
                    for a in t.top
                ],
            )
            for t in logprobs
        ]
    )


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def prompt_token_ids(self, req: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
        """The messages (and tools) rendered with the tokenizer's chat template, then tokenized (off the event loop)."""
        tokenizer = self.ctx.engine.tokenizer
        return await self.ctx.encoder.encode_rendered(
            lambda: render_prompt(req, tokenizer, plan), sum(len(m.text()) for m in req.messages), "messages"
        )

    async def create(self, req: ChatCompletionRequest, arrival: float) -> Response:
        ctx = self.ctx
        ctx.check_model(req.model)
        ctx.check_choices(1, req.n)
        plan = plan_tools(req, ctx.engine.tokenizer)
        prompt_ids = await self.prompt_token_ids(req, plan)
        ctx.check_token_ids([t for t, _ in req.logit_bias_pairs()], "logit_bias")
        grammar = await ctx.structured().for_response_format(req.response_format) or await forced_call_grammar(
            req, plan, ctx.engine.tokenizer, ctx.structured()
        )
        max_tokens = ctx.check_fits(len(prompt_ids), req.completion_limit(), "messages")
        request_id = new_id("chatcmpl")
        jobs = [
            Job(
                i,
                f"{request_id}-{i}",
                prompt_ids,
                sampling_params(req, max_tokens, req.logprobs_count(), i, ctx.sampling_defaults, grammar),
            )
            for i in range(req.n)
        ]
        parsers = [plan.parser() for _ in range(req.n)]
        streams = ChoiceStreams(ctx, jobs, arrival)
        try:
            await streams.start()
            if req.stream:
                return EventSourceResponse(
                    self._stream(req, request_id, streams, len(prompt_ids), parsers),
                    sep="\n",
                    shutdown_grace_period=ctx.settings.drain_timeout_s,
                )
            states = [ChoiceState() for _ in jobs]
            async for i, out in streams.outputs():
                states[i].add(out)
                if parsers[i] is not None:
                    parsers[i].feed(out.text, out.token_ids)
        except BaseException:  # refused, failed, or cancelled because the client left
            streams.close()
            raise
        choices = []
        for i, s in enumerate(states):
            parser = parsers[i]
            if parser is None:
                message, reason = ChatResponseMessage(content=s.text), s.finish_reason
            else:
                parser.finish()
                content = parser.content if parser.content.strip() or not parser.calls else None
                calls = [ResponseToolCall.model_validate(c) for c in response_calls(parser.calls)] or None
                message, reason = (
                    ChatResponseMessage(content=content, tool_calls=calls),
                    finish_reason(s.finish_reason, parser.calls),
                )
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    finish_reason=reason,
                    logprobs=chat_logprobs(s.logprobs) if req.logprobs else None,
                )
            )
        body = ChatCompletionResponse(
            id=request_id, model=ctx.model_name, choices=choices, usage=total_usage(len(prompt_ids), states)
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        streams: ChoiceStreams,
        prompt_tokens: int,
        parsers: list[ToolCallParser | None],
    ) -> AsyncIterator[str | bytes]:
        created = int(time.time())
        states = [ChoiceState() for _ in range(req.n)]

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(
                id=request_id, created=created, model=self.ctx.model_name, choices=choices, usage=usage
            ).model_dump_json()

        text_chunks: dict[int, TextChunks] = {}  # choice -> the template of its content-only chunks

        def text_chunk(i: int, text: str) -> bytes:
            if i not in text_chunks:
                text_chunks[i] = TextChunks(lambda t: chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=t))]))
            return sse_event(text_chunks[i].chunk(text))

        try:
            for i in range(req.n):
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            async for i, out in streams.outputs():
                states[i].add(out)
                parser = parsers[i]
                if parser is None and out.text and not out.finished and not req.logprobs:
                    yield text_chunk(i, out.text)
                    continue
                logprobs = chat_logprobs(out.logprobs or ()) if req.logprobs and out.logprobs else None
                if parser is None:
                    deltas = [ChatDelta(content=out.text)] if out.text else []
                else:
                    events = parser.feed(out.text, out.token_ids) + (parser.finish() if out.finished else [])
                    deltas = [_delta(e) for e in events]
                if logprobs is not None and not deltas:
                    deltas = [ChatDelta(content="")]
                for k, delta in enumerate(deltas):
                    yield chunk([ChatChunkChoice(index=i, delta=delta, logprobs=logprobs if k == 0 else None)])
                if out.finished:
                    reason = out.finish_reason if parser is None else finish_reason(out.finish_reason, parser.calls)
                    yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=reason)])
            if req.include_usage:
                yield chunk([], usage=total_usage(prompt_tokens, states))
        except errors.APIError as err:
            yield err.json()
        except Exception:
            log.exception("chat stream %s failed", request_id)
            yield errors.internal_error().json()
        finally:
            streams.close()
        yield "[DONE]"


def _delta(event: Event) -> ChatDelta:
    """One parser event as OpenAI streams it: content, a call's first delta (id, type, name, empty
    arguments), or a piece of its arguments."""
    if isinstance(event, ContentDelta):
        return ChatDelta(content=event.text)
    if isinstance(event, CallStart):
        return ChatDelta(
            tool_calls=[
                DeltaToolCall(
                    index=event.index,
                    id=event.id,
                    type="function",
                    function=DeltaFunctionCall(name=event.name, arguments=""),
                )
            ]
        )
    assert isinstance(event, ArgumentsDelta)
    return ChatDelta(tool_calls=[DeltaToolCall(index=event.index, function=DeltaFunctionCall(arguments=event.text))])
