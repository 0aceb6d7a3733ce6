"""The engine: `EngineCore` runs one model step at a time (plain, synchronous, single-threaded);
`AsyncEngine` drives it from a background thread and streams `RequestOutput`s to asyncio callers.

Threads: the asyncio side only puts commands ("add", "abort", "abort_all") into an inbox and wakes
the step thread; the step thread alone touches the scheduler, the runner and the sequences, and
hands outputs back with `loop.call_soon_threadsafe`. A command is taken in before the next step,
so an abort frees the request's KV blocks within one step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch

from athena_runtime.batch import SequenceChunk
from athena_runtime.block_manager import BlockManager
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.format.generation_defaults import read_generation_defaults
from athena_runtime.outputs import EngineStats, RequestOutput, TokenLogprob, TopLogprob
from athena_runtime.prefix_cache import PrefixCache
from athena_runtime.sampler import RequestGenerator, Sample, Sampler
from athena_runtime.sampling_params import SamplingParams
from athena_runtime.scheduler import Scheduler
from athena_runtime.sequence import Sequence
from athena_runtime.stop_strings import TextStream
from athena_runtime.token_decoder import TokenDecoder

log = logging.getLogger(__name__)
# one DEBUG line per step (its shape and wall time) when enabled: a diagnosis of admission under load (bench.serve_gap
# --step-trace); off, a step pays one isEnabledFor
step_log = logging.getLogger("athena_runtime.engine.steps")


class ContextLengthExceeded(ValueError):
    """The prompt plus max_tokens can never fit (model context length or KV cache size)."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: try again later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or stopped."""


class GroupTooLarge(ValueError):
    """A group of requests larger than the waiting queue: it could never be admitted."""


class RequestStream:
    """One request's outputs as an async iterator, ending after its finished output. Closing it
    before that (`close()`, from any code, even before the first output) withdraws the request."""

    def __init__(
        self, request_id: str, outputs: "asyncio.Queue[RequestOutput]", on_close: Callable[[str, bool], None]
    ) -> None:
        self.request_id = request_id
        self._outputs, self._on_close = outputs, on_close
        self._finished = self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        out = await self._outputs.get()
        if out.finished:
            self._finished = True
            self.close()
        return out

    def close(self) -> None:
        """Stop listening; aborts the request unless it finished."""
        if not self._closed:
            self._closed = True
            self._on_close(self.request_id, self._finished)

    async def aclose(self) -> None:
        self.close()


class EngineCore:
    """Scheduler + runner + sampler + detokenizer, one `step()` at a time."""

    def __init__(
        self, runner: Any, tokenizer: Any, settings: EngineSettings, eos_token_ids: tuple[int, ...] = ()
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        # called once a step's model work is queued, before its sampler waits for it (AsyncEngine._run)
        self.on_launched: Callable[[], None] | None = None
        self.token_decoder = TokenDecoder(tokenizer)
        log.info("detokenizer: %s", self.token_decoder.kind)
        self.settings = settings
        self.eos_token_ids = frozenset(eos_token_ids)
        prefix_cache = PrefixCache(runner.block_size) if settings.prefix_cache else None
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size, prefix_cache)
        log.info("prefix cache: %s", "off" if prefix_cache is None else "on (full KV blocks reused across requests)")
        chunk = settings.prefill_chunk(torch.device(getattr(runner, "device", "cpu")).type)
        self.scheduler = Scheduler(self.block_manager, settings.max_num_seqs, settings.max_num_batched_tokens, chunk)
        log.info(
            "prefill: up to %d prompt tokens a step while requests decode (%s), else up to %d",
            chunk,
            "set" if settings.prefill_chunk_tokens else "the device's default",
            settings.max_num_batched_tokens,
        )
        self.sampler = Sampler()
        limits = [n for n in (settings.max_model_len, getattr(runner, "max_model_len", None)) if n]
        self.max_model_len: int = min(limits) if limits else runner.num_blocks * runner.block_size
        config = getattr(runner, "config", None)
        self.vocab_size: int = (
            getattr(runner, "vocab_size", None) or getattr(config, "vocab_size", None) or len(tokenizer)
        )
        self._arrivals = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse, up front, a request that could never be served."""
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("the prompt must contain at least one token")
        if any(t >= self.vocab_size for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be below the vocabulary size {self.vocab_size}")
        total = n_prompt + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({n_prompt} in the prompt, {params.max_tokens} in the completion). "
                "Please reduce the length of the prompt or completion."
            )
        need = self.block_manager.blocks_for(total)
        if need > self.block_manager.num_blocks:
            capacity = self.block_manager.num_blocks * self.block_manager.block_size
            raise ContextLengthExceeded(
                f"The KV cache holds {capacity} tokens, but this request needs up to {total} tokens "
                f"({n_prompt} in the prompt, {params.max_tokens} in the completion). "
                "Please reduce the length of the prompt or completion."
            )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.check_request(prompt_token_ids, params)
        generator = RequestGenerator().manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        seq = Sequence(request_id, prompt_token_ids, params, self._arrivals, generator)
        seq.stream = TextStream(self.token_decoder.decode, seq.prompt_token_ids, params.stop)
        if params.constraint is not None:
            seq.constraint = params.constraint.new()
        self.scheduler.add(seq)
        self._arrivals += 1
        self.prompt_tokens_total += len(prompt_token_ids)

    def abort(self, request_id: str, reason: str = "cancelled", error: str | None = None) -> RequestOutput | None:
        seq = self.scheduler.requests.get(request_id)
        return None if seq is None else self._finish(seq, reason, "", (), None, error)

    def abort_all(self, reason: str = "cancelled", error: str | None = None) -> list[RequestOutput]:
        return [self.abort(rid, reason, error) for rid in list(self.scheduler.requests)]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        if not step_log.isEnabledFor(logging.DEBUG):
            return self._step()
        t0 = time.perf_counter()
        waiting = len(self.scheduler.waiting)
        outputs = self._step()
        sizes = [n for _, n in self._last_batch]
        chunks = [n for n in sizes if n > 1]
        step_log.debug(
            "step %.2f ms: %d one-token rows, %d prompt tokens in %d chunks; %d waiting before",
            1e3 * (time.perf_counter() - t0),
            len(sizes) - len(chunks),
            sum(chunks),
            len(chunks),
            waiting,
        )
        return outputs

    def _step(self) -> list[RequestOutput]:
        batch = self._last_batch = self.scheduler.schedule()
        if not batch:
            return []
        blocks_for = self.block_manager.blocks_for
        chunks, due_rows = [], []  # due_rows: chunks that reach their sequence's last token
        for i, (seq, n) in enumerate(batch):
            start = seq.num_computed
            chunks.append(SequenceChunk(seq.next_chunk(n), start, seq.block_table[: blocks_for(start + n)]))
            if start + n == seq.num_tokens:
                due_rows.append(i)
        try:
            self.sampler.prepare([batch[i][0] for i in due_rows])  # grammar masks: on a worker, during the forward
            logits = self.runner.execute(chunks)  # [len(chunks), V]
            if self.on_launched is not None:  # the step's GPU work is queued; the sampler waits for it
                self.on_launched()
            due = self.scheduler.advance(batch)
            if not due:  # only prompt chunks short of their prompt's end: nothing to sample
                return []
            if len(due_rows) < len(chunks):
                rows = torch.tensor(due_rows, dtype=torch.long).to(logits.device, non_blocking=True)
                logits = logits.index_select(0, rows)  # [len(due), V]
            samples = self.sampler(logits, due)  # a Sequence has the fields of a SampleRow
        except Exception as exc:  # a failed step fails its requests, never the engine
            log.exception("model step failed; failing %d request(s)", len(batch))
            message = f"{type(exc).__name__}: {exc}"
            return [self._finish(c.seq, "error", "", (), None, message) for c in batch]
        return [self._append(seq, sample) for seq, sample in zip(due, samples)]

    def _append(self, seq: Sequence, sample: Sample) -> RequestOutput:
        token = sample.token_id
        seq.output_token_ids.append(token)
        self.generation_tokens_total += 1
        logprobs = None if sample.logprob is None else (self._token_logprob(sample),)
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return self._finish(seq, "stop", seq.stream.flush(), (token,), logprobs)
        if seq.constraint is not None and not seq.constraint.accept(token):
            log.error("%s: sampled token %d is outside its grammar", seq.request_id, token)
            return self._finish(seq, "error", "", (token,), logprobs, f"token {token} is outside the request's grammar")
        text, hit = seq.stream.add(token)
        if hit:
            return self._finish(seq, "stop", text, (token,), logprobs)
        if seq.constraint is not None and seq.constraint.is_finished():  # complete: only a stop token could follow
            return self._finish(seq, "stop", text + seq.stream.flush(), (token,), logprobs)
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length", text + seq.stream.flush(), (token,), logprobs)
        return self._output(seq, text, (token,), logprobs)

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        text: str,
        token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...] | None,
        error: str | None = None,
    ) -> RequestOutput:
        self.scheduler.finish(seq, reason)
        return self._output(seq, text, token_ids, logprobs, reason, error)

    @staticmethod
    def _output(
        seq: Sequence,
        text: str,
        token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...] | None,
        finish_reason: str | None = None,
        error: str | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            text,
            token_ids,
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            logprobs=logprobs,
            prompt_tokens=len(seq.prompt_token_ids),
            completion_tokens=len(seq.output_token_ids),
            error=error,
        )

    def _token_logprob(self, sample: Sample) -> TokenLogprob:
        text = self.token_decoder.token_text
        top = tuple(TopLogprob(t, text(t), lp) for t, lp in sample.top)
        return TokenLogprob(sample.token_id, text(sample.token_id), sample.logprob, top)

    def stats(self) -> EngineStats:
        bm, cache = self.block_manager, self.block_manager.prefix_cache
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries_total=0 if cache is None else cache.queries,
            prefix_cache_hits_total=0 if cache is None else cache.hits,
        )


def find_eos_token_ids(tokenizer: Any, path: str | Path | None = None) -> tuple[int, ...]:
    """The tokenizer's eos id plus those of the folder's generation_config.json (Llama 3 has several)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = Path(path) / "generation_config.json" if path is not None else None
    if config is not None and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    return tuple(sorted(ids))


class AsyncEngine:
    def __init__(
        self,
        runner: Any,
        tokenizer: Any,
        settings: EngineSettings,
        model_name: str,
        eos_token_ids: tuple[int, ...] | None = None,
        generation_defaults: dict[str, int | float] | None = None,
    ) -> None:
        if eos_token_ids is None:
            eos_token_ids = find_eos_token_ids(tokenizer)
        # the model's own sampling defaults (generation_config.json); the server decides whether to use them
        self.generation_defaults: dict[str, int | float] = dict(generation_defaults or {})
        self.core = EngineCore(runner, tokenizer, settings, eos_token_ids)
        self.tokenizer = tokenizer
        self.settings = settings
        self.model_name = model_name
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(self.core.eos_token_ids))
        self.max_model_len: int = self.core.max_model_len
        self.max_queue: int = settings.max_queue
        self.ready = False
        self._closed = False
        self._stop = False
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}  # loop thread only
        self._live: set[str] = set()  # submitted, not finished (loop thread only)
        self._submitted_unseen = 0  # adds not yet taken in by the step thread
        # a step's outputs are held for the next step's launch when there are more than this many (_run)
        self.hold_outputs_above = 8

    @classmethod
    def from_path(cls, path: str | Path, settings: EngineSettings, model_name: str | None = None) -> "AsyncEngine":
        from transformers import AutoTokenizer

        from athena_runtime.model_runner import ModelRunner

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        runner = ModelRunner.from_path(
            path,
            kv_format=settings.kv_cache,
            block_size=settings.block_size,
            num_blocks=settings.num_blocks,
            kv_budget_bytes=settings.kv_budget_bytes,
            device=settings.device,
            max_model_len=settings.max_model_len,
            kv_hadamard=settings.kv_hadamard,
            use_cuda_graphs=settings.use_cuda_graphs,
        )
        runner.capture_graphs(settings.max_num_seqs)  # at start-up, not in the middle of a request
        return cls(
            runner,
            tokenizer,
            settings,
            model_name or path.name,
            find_eos_token_ids(tokenizer, path),
            read_generation_defaults(path),
        )

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="athena-engine", daemon=True)
        self._thread.start()
        self.ready = True

    def submit(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[RequestStream]:
        """Admit a group of requests (the choices of one API request) all together or not at all:
        raises, with nothing queued, if the engine is closed (EngineClosed), a request can never fit
        (ContextLengthExceeded), the group is larger than the waiting queue (GroupTooLarge) or the
        queue has no room for all of it now (EngineOverloaded). Call on the event loop."""
        if self._closed or self._thread is None:
            raise EngineClosed("the engine is not running" if self._thread is None else "the engine is shutting down")
        ids = [request_id for request_id, _, _ in requests]
        if len(set(ids)) < len(ids) or any(i in self._queues or i in self._live for i in ids):
            raise ValueError("duplicate request id")
        for _, prompt_token_ids, params in requests:
            self.core.check_request(prompt_token_ids, params)
        if len(requests) > self.max_queue:
            raise GroupTooLarge(
                f"{len(requests)} requests at once can never be admitted: the queue holds {self.max_queue}"
            )
        if self.stats().waiting + len(requests) > self.max_queue:
            raise EngineOverloaded(f"no room for {len(requests)} more requests: the queue holds {self.max_queue}")
        streams = []
        for request_id in ids:
            out_queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
            self._queues[request_id] = out_queue
            self._live.add(request_id)
            streams.append(RequestStream(request_id, out_queue, self._stream_closed))
        self._submitted_unseen += len(requests)
        self._send(("add", [(i, list(p), params) for i, p, params in requests]))
        return streams

    def _stream_closed(self, request_id: str, finished: bool) -> None:
        self._queues.pop(request_id, None)
        if not finished:  # closed early: client gone, task cancelled
            self._send(("abort", request_id))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs (`submit` of one; its checks raise at the first `__anext__`)."""
        (stream,) = self.submit([(request_id, prompt_token_ids, params)])
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        """The core's figures; requests submitted but not yet taken in by the step thread count as waiting."""
        stats = self.core.stats()
        return dataclasses.replace(stats, waiting=stats.waiting + self._submitted_unseen)

    async def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Stop admitting; let live requests finish for up to `drain_timeout_s`; cancel the rest."""
        self._closed = True
        self.ready = False
        if self._thread is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        while self._live and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self._send(("abort_all",))
        self._stop = True
        self._wake.set()
        await loop.run_in_executor(None, self._thread.join)
        self._thread = None
        await asyncio.sleep(0)  # let the last outputs handed over reach their queues

    # -- step thread -------------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _run(self) -> None:
        """The step loop. With many outputs a step, they are held until the next step's GPU work is queued
        (`EngineCore.on_launched`) and handed to the event loop then: its per-output work (queues, detokenized
        deltas, SSE events) runs while that step computes, instead of taking the GIL from the next step's
        host work. Held outputs always go before anything newer; with few outputs, or no next step, at once."""
        held: list[RequestOutput] = []

        def release() -> None:
            nonlocal held
            if held:
                self._deliver_threadsafe(held)
                held = []

        self.core.on_launched = release
        while True:
            self._wake.clear()
            outputs = self._take_commands()
            if outputs or self._stop:
                release()
                self._deliver_threadsafe(outputs)
            if self._stop:
                return
            if self.core.has_work():
                try:
                    outputs = self.core.step()
                except Exception as exc:  # a bug outside the model step: fail everything, keep serving
                    log.exception("engine step failed; failing all requests")
                    outputs = self.core.abort_all("error", f"{type(exc).__name__}: {exc}")
                release()
                if len(outputs) > self.hold_outputs_above and self.core.has_work():
                    held = outputs
                else:
                    self._deliver_threadsafe(outputs)
            if not self.core.has_work():
                release()
                self._wake.wait()

    def _take_commands(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            kind, *args = command
            if kind == "add":
                (group,) = args
                self._call_soon(self._took_adds, len(group))
                for request_id, prompt, params in group:
                    try:
                        self.core.add_request(request_id, prompt, params)
                    except Exception as exc:
                        outputs.append(
                            RequestOutput(
                                request_id,
                                "",
                                (),
                                finished=True,
                                finish_reason="error",
                                prompt_tokens=len(prompt),
                                error=str(exc),
                            )
                        )
            elif kind == "abort":
                out = self.core.abort(args[0])
                outputs += [out] if out is not None else []
            elif kind == "abort_all":
                outputs += self.core.abort_all()

    def _took_adds(self, count: int) -> None:
        self._submitted_unseen -= count

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _deliver_threadsafe(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self._call_soon(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
            out_queue = self._queues.get(out.request_id)
            if out_queue is not None:
                out_queue.put_nowait(out)
