"""POST /v1/completions: a prompt (or a batch of them) -> n generations each -> response or SSE chunks.

Choice `i * n + j` is the j-th generation for prompt i (OpenAI's order).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from sse_starlette import EventSourceResponse
from starlette.responses import Response

from athena_runtime.outputs import TokenLogprob
from server import errors
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    finite_logprob,
)
from server.serving import ChoiceState, ChoiceStreams, Job, ServingContext, new_id, sampling_params, total_usage
from server.stream_chunks import TextChunks, sse_event

log = logging.getLogger("athena.server")


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str  # what `echo` puts in front of the completion


def legacy_logprobs(logprobs: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The completions API's parallel-list format; `offset` is where the first token's text starts."""
    out = CompletionLogprobs()
    for t in logprobs:
        out.tokens.append(t.token)
        out.token_logprobs.append(finite_logprob(t.logprob))
        out.top_logprobs.append({a.token: finite_logprob(a.logprob) for a in t.top})
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def prompts(self, req: CompletionRequest) -> list[Prompt]:
        """The batch as token ids; text is tokenized off the event loop."""
        given = req.prompts()
        if given and isinstance(given[0], str):
            texts: list[str] = given  # type: ignore[assignment]
            out = [Prompt(ids, text) for ids, text in zip(await self.ctx.encoder.encode(texts, "prompt"), texts)]
        else:
            out = []
            for ids in given:
                self.ctx.check_fits(len(ids), req.max_tokens, "prompt")  # before looking at every id
                self.ctx.check_token_ids(ids, "prompt")  # type: ignore[arg-type]
                out.append(Prompt(list(ids), ""))  # type: ignore[arg-type]
            if req.echo:
                decoded = await asyncio.to_thread(lambda: [self.ctx.engine.tokenizer.decode(p.token_ids) for p in out])
                out = [Prompt(p.token_ids, text) for p, text in zip(out, decoded)]
        if any(not p.token_ids for p in out):
            raise errors.invalid_request("prompt must not be empty", param="prompt")
        return out

    async def create(self, req: CompletionRequest, arrival: float) -> Response:
        ctx = self.ctx
        ctx.check_model(req.model)
        ctx.check_choices(len(req.prompts()), req.n)
        prompts = await self.prompts(req)
        budgets = [ctx.check_fits(len(p.token_ids), req.max_tokens, "prompt") for p in prompts]
        ctx.check_token_ids([t for t, _ in req.logit_bias_pairs()], "logit_bias")
        grammar = await ctx.structured().for_response_format(req.response_format)
        request_id = new_id("cmpl")
        jobs = [
            Job(
                i * req.n + j,
                f"{request_id}-{i * req.n + j}",
                p.token_ids,
                sampling_params(req, budget, req.logprobs, j, ctx.sampling_defaults, grammar),
            )
            for i, (p, budget) in enumerate(zip(prompts, budgets))
            for j in range(req.n)
        ]
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        streams = ChoiceStreams(ctx, jobs, arrival)
        try:
            await streams.start()
            if req.stream:
                return EventSourceResponse(
                    self._stream(req, request_id, streams, prompts, prompt_tokens),
                    sep="\n",
                    shutdown_grace_period=ctx.settings.drain_timeout_s,
                )
            states = await streams.collect()
        except BaseException:  # refused, failed, or cancelled because the client left
            streams.close()
            raise
        choices = []
        for index, s in enumerate(states):
            prefix = prompts[index // req.n].text if req.echo else ""
            choices.append(
                CompletionChoice(
                    index=index,
                    text=prefix + s.text,
                    finish_reason=s.finish_reason,
                    logprobs=legacy_logprobs(s.logprobs, 0) if req.logprobs is not None else None,
                )
            )
        body = CompletionResponse(
            id=request_id, model=ctx.model_name, choices=choices, usage=total_usage(prompt_tokens, states)
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(
        self, req: CompletionRequest, request_id: str, streams: ChoiceStreams, prompts: list[Prompt], prompt_tokens: int
    ) -> AsyncIterator[str | bytes]:
        created = int(time.time())
        states = [ChoiceState() for _ in range(len(prompts) * req.n)]
        offsets = [0] * len(states)  # text already sent per choice, for logprobs' text_offset

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return CompletionResponse(
                id=request_id, created=created, model=self.ctx.model_name, choices=choices, usage=usage
            ).model_dump_json()

        text_chunks: dict[int, TextChunks] = {}  # choice -> the template of its text-only chunks

        def text_chunk(i: int, text: str) -> bytes:
            if i not in text_chunks:
                text_chunks[i] = TextChunks(lambda t: chunk([CompletionChoice(index=i, text=t, finish_reason=None)]))
            return sse_event(text_chunks[i].chunk(text))

        try:
            if req.echo:
                for i in range(len(states)):
                    offsets[i] = len(prompts[i // req.n].text)
                    yield chunk([CompletionChoice(index=i, text=prompts[i // req.n].text, finish_reason=None)])
            async for i, out in streams.outputs():
                states[i].add(out)
                if out.text and not out.finished and req.logprobs is None:
                    yield text_chunk(i, out.text)
                elif out.text or out.finished or (req.logprobs is not None and out.logprobs):
                    logprobs = legacy_logprobs(out.logprobs or (), offsets[i]) if req.logprobs is not None else None
                    offsets[i] += len(out.text)
                    yield chunk(
                        [
                            CompletionChoice(
                                index=i,
                                text=out.text,
                                logprobs=logprobs,
                                finish_reason=out.finish_reason if out.finished else None,
                            )
                        ]
                    )
            if req.include_usage:
                yield chunk([], usage=total_usage(prompt_tokens, states))
        except errors.APIError as err:
            yield err.json()
        except Exception:
            log.exception("completion stream %s failed", request_id)
            yield errors.internal_error().json()
        finally:
            streams.close()
        yield "[DONE]"
