"""What both endpoints share: the request context, sampling parameters from a request, and
`ChoiceStreams`, which runs one engine generation per choice and merges their outputs.

Cancellation path: each choice is consumed by its own task; `ChoiceStreams.close()` cancels
those tasks, the cancellation closes the engine iterator (its `finally` runs `aclose()`), and
closing the iterator aborts the request in the engine and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import Response

from athena_runtime.outputs import RequestOutput, TokenLogprob
from athena_runtime.sampling_params import SamplingParams
from server import errors
from server.metrics import ServerMetrics
from server.prompt_encoder import PromptEncoder
from server.protocol import SamplingRequest, Usage
from server.retry_after import RetryAfterEstimator
from server.settings import ServerSettings
from server.stream_chunks import merge_outputs

if TYPE_CHECKING:
    from athena_runtime.engine import AsyncEngine, RequestStream
    from athena_runtime.token_masks import ConstraintFactory
    from server.structured import StructuredOutputs

log = logging.getLogger("athena.server")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; no client ever sees it


@dataclass
class ServingContext:
    """Everything a request handler needs, kept on `app.state.serving` once the engine is up."""

    engine: "AsyncEngine"
    model_name: str
    settings: ServerSettings
    metrics: ServerMetrics
    encoder: PromptEncoder
    max_choices: int  # choices (prompts x n) one request may ask for
    retry_after: RetryAfterEstimator
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # strong refs to running choice tasks
    sampling_defaults: dict[str, int | float] = field(default_factory=dict)  # for the fields a request leaves out
    _structured: "StructuredOutputs | None" = field(default=None, repr=False)

    def structured(self) -> "StructuredOutputs":
        """Grammars for structured outputs and tool calls (server/structured.py), made on first use."""
        if self._structured is None:
            from server.structured import StructuredOutputs

            tokenizer = self.engine.tokenizer
            eos = getattr(self.engine, "eos_token_ids", None) or (tokenizer.eos_token_id,)
            self._structured = StructuredOutputs(tokenizer, tuple(eos))
        return self._structured

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise errors.APIError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )

    def check_choices(self, prompts: int, n: int) -> None:
        """A 400 for more choices than one request may have, before any work is done for them."""
        if prompts * n > self.max_choices:
            asked = f"{prompts} prompts x n={n} = {prompts * n} choices" if prompts > 1 else f"{n} choices"
            raise errors.invalid_request(
                f"This request asks for {asked}; this server generates at most {self.max_choices} per request "
                "(--max-choices, at most --max-queue).",
                param="n",
            )

    def check_fits(self, prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """The completion budget for a prompt: `max_tokens`, or what is left of the context when
        None; a 400 `context_length_exceeded` when the two do not fit."""
        limit = self.engine.max_model_len
        budget = limit - prompt_tokens if max_tokens is None else max_tokens
        if budget < 1 or prompt_tokens + budget > limit:
            raise errors.context_length_exceeded(limit, prompt_tokens, max(budget, max_tokens or 0), param)
        return budget

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.engine.tokenizer)
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise errors.invalid_request(f"token ids must be in [0, {vocab})", param=param)


def sampling_params(
    req: SamplingRequest,
    max_tokens: int,
    logprobs: int | None,
    choice: int,
    defaults: dict[str, int | float] | None = None,
    constraint: "ConstraintFactory | None" = None,
) -> SamplingParams:
    """The engine's parameters for choice `choice` of a request (with a seed, choice i uses seed + i). A knob the
    request leaves out takes `defaults` (the model's generation config, `ServerSettings.sampling_defaults`), else the
    OpenAI API's default. `constraint`: the grammar of a structured output or forced tool call."""
    seed = None if req.seed is None else (req.seed + choice) % 2**63
    defaults = defaults or {}

    def knob(name: str, openai_default: int | float) -> int | float:
        given = getattr(req, name)
        return given if given is not None else defaults.get(name, openai_default)

    try:
        return SamplingParams(
            temperature=knob("temperature", 1.0),
            top_p=knob("top_p", 1.0),
            top_k=max(0, int(knob("top_k", 0))),
            min_p=knob("min_p", 0.0),
            seed=seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=knob("repetition_penalty", 1.0),
            max_tokens=max_tokens,
            stop=req.stop_sequences(),
            logprobs=logprobs,
            logit_bias=req.logit_bias_pairs(),
            constraint=constraint,
        )
    except ValueError as exc:  # SamplingParams' own checks; the message names the field
        raise errors.invalid_request(str(exc)) from None


@dataclass(frozen=True)
class Job:
    index: int  # choice index in the response
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceState:
    """One choice's output so far (for non-streaming responses and for usage)."""

    text: str = ""
    token_count: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_count = max(self.token_count + len(out.token_ids), out.completion_tokens)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason


def total_usage(prompt_tokens: int, states: list[ChoiceState]) -> Usage:
    completion = sum(s.token_count for s in states)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


class ChoiceStreams:
    """Runs one engine generation per job and merges their outputs as (choice index, output).

    The jobs are submitted to the engine as one group, admitted all together or not at all: the
    constructor raises the client-facing error (429 queue full, 400 too many choices, 503 shutting
    down) with nothing queued."""

    def __init__(self, ctx: ServingContext, jobs: list[Job], arrival: float) -> None:
        self._ctx, self._jobs, self._arrival = ctx, jobs, arrival
        try:
            streams = ctx.engine.submit([(job.request_id, job.prompt_token_ids, job.params) for job in jobs])
        except Exception as exc:
            raise self._api_error(exc) from None
        self._streams: list["RequestStream"] = streams
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._tasks = [
            asyncio.create_task(self._run(job, stream), name=job.request_id) for job, stream in zip(jobs, streams)
        ]
        for task in self._tasks:
            ctx.tasks.add(task)
            task.add_done_callback(ctx.tasks.discard)

    def _api_error(self, exc: BaseException) -> errors.APIError:
        ctx = self._ctx
        api_error = errors.from_engine_error(
            exc, ctx.settings.retry_after_s, lambda: ctx.retry_after.seconds(ctx.engine.stats().waiting)
        )
        if api_error is None:
            log.error("request %s failed", self._jobs[0].request_id if self._jobs else "?", exc_info=exc)
            api_error = errors.internal_error()
        return api_error

    async def _run(self, job: Job, outputs: "RequestStream") -> None:
        m = self._ctx.metrics
        last: float | None = None
        try:
            async for out in outputs:
                now, n = time.perf_counter(), len(out.token_ids)
                if last is None:
                    m.time_to_first_token.observe(now - self._arrival)
                    m.prompt_tokens.inc(out.prompt_tokens or len(job.prompt_token_ids))
                elif n:
                    m.time_per_output_token.observe((now - last) / n)
                last = now
                m.generation_tokens.inc(n)
                self._queue.put_nowait((job.index, out))
                if out.finished:
                    self._ctx.retry_after.finished()
                    return
            log.error("engine stream for %s ended without a finished output", job.request_id)
            self._queue.put_nowait((job.index, RuntimeError("engine stream ended early")))
        except Exception as exc:
            self._queue.put_nowait((job.index, exc))
        finally:
            outputs.close()

    def _check(self, index: int, item: RequestOutput | BaseException) -> RequestOutput:
        """The output, or the client-facing error it stands for."""
        if isinstance(item, BaseException):
            self.close()
            raise self._api_error(item)
        if item.finished and item.finish_reason == "cancelled":
            self.close()
            raise errors.unavailable(
                "The request was cancelled by the server (shutting down).", self._ctx.settings.retry_after_s
            )
        if item.finished and item.finish_reason == "error":
            self.close()
            log.error("engine error for %s: %s", item.request_id, item.error)
            raise errors.internal_error()
        return item

    async def start(self) -> None:
        """Waits until every choice has its first output, so that a request the engine refuses
        (context too long, queue full, shutting down) fails with its HTTP status before a
        streamed response has begun."""
        seen: set[int] = set()
        while len(seen) < len(self._jobs):
            index, item = await self._queue.get()
            self._buffer.append((index, self._check(index, item)))
            seen.add(index)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        finished: set[int] = set()
        buffered, self._buffer = self._buffer, []
        for index, out in buffered:
            if out.finished:
                finished.add(index)
            yield index, out
        carried: tuple[int, RequestOutput | BaseException] | None = None
        while len(finished) < len(self._jobs):
            # everything that arrived meanwhile, each choice's outputs merged: a consumer that fell behind
            # the engine (a busy event loop) catches up with one chunk per choice, not one per token. A failure
            # waits for the next round, so the outputs before it are sent first, as they came.
            merged: dict[int, RequestOutput] = {}
            index, item = carried if carried is not None else await self._queue.get()
            carried = None
            while True:
                if merged and _fails(item):
                    carried = (index, item)
                    break
                out = self._check(index, item)
                merged[index] = out if index not in merged else merge_outputs(merged[index], out)
                if self._queue.empty():
                    break
                index, item = self._queue.get_nowait()
            for index, out in merged.items():
                if out.finished:
                    finished.add(index)
                yield index, out

    async def collect(self) -> list[ChoiceState]:
        states = [ChoiceState() for _ in self._jobs]
        async for index, out in self.outputs():
            states[index].add(out)
        return states

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for stream in self._streams:  # a task cancelled before it started never closes its stream itself
            stream.close()


def _fails(item: RequestOutput | BaseException) -> bool:
    """Whether `ChoiceStreams._check` turns this item into an error."""
    return isinstance(item, BaseException) or (item.finished and item.finish_reason in ("cancelled", "error"))


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Runs `work`; if the client disconnects first, cancels it (which aborts its generations)."""

    async def disconnected() -> None:
        # The body has been read: the next message is http.disconnect, whenever the client leaves.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind: its generations get aborted
    if task in done:
        return task.result()
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
