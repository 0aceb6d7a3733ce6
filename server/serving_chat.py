"""POST /v1/chat/completions: messages -> chat template -> n generations -> response or SSE chunks."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

import jinja2
from sse_starlette import EventSourceResponse
from starlette.responses import Response

from athena_runtime.chat_prompt import render_chat
from athena_runtime.outputs import TokenLogprob
from server import errors
from server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatResponseMessage, TokenLogprobEntry, TopLogprobEntry, Usage, finite_logprob,
)
from server.serving import ChoiceState, ChoiceStreams, Job, ServingContext, new_id, sampling_params, total_usage

log = logging.getLogger("athena.server")


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        TokenLogprobEntry(
            token=t.token, logprob=finite_logprob(t.logprob), bytes=list(t.token.encode("utf-8")),
            top_logprobs=[TopLogprobEntry(token=a.token, logprob=finite_logprob(a.logprob),
                                          bytes=list(a.token.encode("utf-8"))) for a in t.top],
        )
        for t in logprobs
    ])


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def prompt_token_ids(self, req: ChatCompletionRequest) -> list[int]:
        """The messages rendered with the tokenizer's chat template (`render_chat`: a system prompt the template has
        no role for is folded into the first user turn), then tokenized."""
        tokenizer = self.ctx.engine.tokenizer
        # Templates know system/user/assistant; "developer" is OpenAI's newer name for system.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(tokenizer, messages)
        except jinja2.TemplateError as exc:  # the template's own raise_exception("...") messages
            raise errors.invalid_request(f"The messages do not fit the model's chat template: {exc}",
                                         param="messages") from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    async def create(self, req: ChatCompletionRequest, arrival: float) -> Response:
        ctx = self.ctx
        ctx.check_model(req.model)
        prompt_ids = self.prompt_token_ids(req)
        max_tokens = ctx.check_fits(len(prompt_ids), req.completion_limit(), "messages")
        request_id = new_id("chatcmpl")
        jobs = [Job(i, f"{request_id}-{i}", prompt_ids,
                    sampling_params(req, max_tokens, req.logprobs_count(), i, ctx.sampling_defaults))
                for i in range(req.n)]
        streams = ChoiceStreams(ctx, jobs, arrival)
        try:
            await streams.start()
            if req.stream:
                return EventSourceResponse(self._stream(req, request_id, streams, len(prompt_ids)), sep="\n",
                                           shutdown_grace_period=ctx.settings.drain_timeout_s)
            states = await streams.collect()
        except BaseException:  # refused, failed, or cancelled because the client left
            streams.close()
            raise
        body = ChatCompletionResponse(
            id=request_id, model=ctx.model_name,
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content=s.text),
                                logprobs=chat_logprobs(s.logprobs) if req.logprobs else None,
                                finish_reason=s.finish_reason) for i, s in enumerate(states)],
            usage=total_usage(len(prompt_ids), states),
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(self, req: ChatCompletionRequest, request_id: str, streams: ChoiceStreams,
                      prompt_tokens: int) -> AsyncIterator[str]:
        created = int(time.time())
        states = [ChoiceState() for _ in range(req.n)]

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(id=request_id, created=created, model=self.ctx.model_name,
                                       choices=choices, usage=usage).model_dump_json()

        try:
            for i in range(req.n):
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            async for i, out in streams.outputs():
                states[i].add(out)
                if out.text or (req.logprobs and out.logprobs):
                    logprobs = chat_logprobs(out.logprobs or ()) if req.logprobs else None
                    yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=out.text), logprobs=logprobs)])
                if out.finished:
                    yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=out.finish_reason)])
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

