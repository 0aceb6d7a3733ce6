"""FakeEngine: the AsyncEngine interface (athena_runtime/engine.py) without a model, for server tests.

A tiny offline byte-level BPE tokenizer with a ChatML chat template; token generation is a
seeded random walk over printable tokens (same seed and prompt -> same tokens; greedy requests
are seeded by the prompt). Honours max_tokens, stop strings (held back until they can no longer
match), ignore_eos, logprobs, a running-batch limit with a bounded waiting queue (EngineOverloaded;
`submit` admits a group all together or not at all, GroupTooLarge when it exceeds the queue), the
context limit (ContextLengthExceeded), cancellation by closing the stream or `abort()`, and shutdown
with a bounded drain. `active` holds the ids of requests not yet finished or cancelled, and
`stats()` counts the KV blocks they hold, so tests can check that nothing leaks.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import AsyncIterator
from functools import lru_cache

from athena_runtime.engine import ContextLengthExceeded, EngineClosed, EngineOverloaded, GroupTooLarge, RequestStream
from athena_runtime.outputs import EngineStats, RequestOutput, TokenLogprob, TopLogprob
from athena_runtime.sampling_params import SamplingParams

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "Athena serves quantized language models over an OpenAI compatible API.",
    "Paged attention keeps the key value cache in blocks of sixteen tokens.",
    "Stop here. Do not go further than the end of the line.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=1)
def tiny_chat_tokenizer():
    """A byte-level BPE (vocab 400) trained on a few sentences, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


class FakeEngine:
    def __init__(
        self,
        *,
        model_name: str = "fake-model",
        max_model_len: int = 256,
        max_num_seqs: int = 8,
        max_queue: int = 64,
        block_size: int = 16,
        num_blocks: int = 1024,
        step_delay_s: float = 0.001,
        eos_probability: float = 0.0,
    ) -> None:
        self.tokenizer = tiny_chat_tokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.block_size, self.num_blocks = block_size, num_blocks
        self.step_delay_s = step_delay_s
        self.eos_probability = eos_probability
        self.ready = False
        self.closed = False
        # Bookkeeping tests read.
        self.active: dict[str, int] = {}  # request id -> KV blocks held (admitted, not finished)
        self.waiting = 0
        self.cancelled: list[str] = []  # closed early or aborted
        self.finished: list[str] = []
        self.shutdown_calls: list[float] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        # Fault injection.
        self.fail_next: BaseException | None = None  # raised by the next generate() before it starts
        self.error_after_tokens: int | None = None  # finish every request with "error" after this many tokens
        # Replays: each new request takes the next text, emits its tokens one by one (special tokens
        # give no text, as the real detokenizer does) and finishes with "stop".
        self.replies: list[str] = []
        self.prompts: list[list[int]] = []  # prompt token ids of every request, in order
        self._aborts: set[str] = set()
        self._abort_all = False
        self._slots: asyncio.Semaphore | None = None
        self._vocab = [
            i
            for i in range(len(self.tokenizer))
            if (s := self.tokenizer.decode([i])).isascii() and s.isprintable() and s.strip() and "<|" not in s
        ]

    # -- interface ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.max_num_seqs)
        self.ready = True

    def submit(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[RequestStream]:
        """All or nothing, as AsyncEngine.submit: every request not yet holding a slot counts as waiting."""
        if self.closed or self._slots is None:
            raise EngineClosed("the engine is not running")
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        for _, prompt_token_ids, params in requests:
            if not prompt_token_ids:
                raise ValueError("the prompt must contain at least one token")
            self.prompts.append(list(prompt_token_ids))
            total = len(prompt_token_ids) + params.max_tokens
            if total > self.max_model_len:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, you requested {total} tokens."
                )
        if len(requests) > self.max_queue:
            raise GroupTooLarge(f"{len(requests)} requests at once can never be admitted")
        if self.waiting + len(requests) > self.max_queue:
            raise EngineOverloaded(f"{self.max_queue} requests are already waiting")
        streams = []
        for request_id, prompt_token_ids, params in requests:
            outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
            self.waiting += 1
            task = asyncio.get_running_loop().create_task(self._serve(request_id, prompt_token_ids, params, outputs))
            streams.append(RequestStream(request_id, outputs, lambda _, finished, t=task: finished or t.cancel()))
        return streams

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        (stream,) = self.submit([(request_id, prompt_token_ids, params)])
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def _serve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        outputs: asyncio.Queue[RequestOutput],
    ) -> None:
        admitted, reason = False, None
        try:
            await self._slots.acquire()
            self.waiting -= 1
            admitted = True
            self.active[request_id] = self._blocks(len(prompt_token_ids))
            self.prompt_tokens_total += len(prompt_token_ids)
            async for out in self._decode(request_id, prompt_token_ids, params):
                reason = out.finish_reason
                outputs.put_nowait(out)
        finally:
            if not admitted:
                self.waiting -= 1
            else:
                self.active.pop(request_id, None)
                self._slots.release()
            (self.cancelled if reason in (None, "cancelled") else self.finished).append(request_id)
            self._aborts.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self._aborts.add(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.active),
            waiting=self.waiting,
            kv_blocks_total=self.num_blocks,
            kv_blocks_used=sum(self.active.values()),
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
        )

    async def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        self.shutdown_calls.append(drain_timeout_s)
        self.closed = True
        self.ready = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        while (self.active or self.waiting) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        self._abort_all = True  # running requests end "cancelled", as do waiting ones when they get a slot

    # -- generation ----------------------------------------------------------------------------
    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _rng(self, prompt_token_ids: list[int], params: SamplingParams) -> random.Random:
        if params.seed is not None:
            return random.Random(params.seed)
        if params.greedy:
            digest = hashlib.sha1(str(prompt_token_ids).encode()).digest()
            return random.Random(int.from_bytes(digest[:8], "little"))
        return random.Random()

    async def _decode(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self.replies:
            async for out in self._replay(request_id, prompt, self.replies.pop(0)):
                yield out
            return
        rng = self._rng(prompt, params)
        eos = self.tokenizer.eos_token_id
        generated: list[int] = []
        text, sent = "", 0  # all generated text; how much of it was handed out
        longest_stop = max((len(s) for s in params.stop), default=0)
        while True:
            await asyncio.sleep(self.step_delay_s)
            if request_id in self._aborts or self._abort_all:
                yield self._out(request_id, prompt, generated, "", (), "cancelled", None)
                return
            if self.error_after_tokens is not None and len(generated) >= self.error_after_tokens:
                yield self._out(request_id, prompt, generated, "", (), "error", None, error="injected failure")
                return
            if not params.ignore_eos and rng.random() < self.eos_probability:
                token = eos
            else:
                token = rng.choice(self._vocab)
            generated.append(token)
            self.generation_tokens_total += 1
            self.active[request_id] = self._blocks(len(prompt) + len(generated))
            logprobs = self._logprobs(token, len(generated), params)
            if token == eos:
                yield self._out(request_id, prompt, generated, text[sent:], (token,), "stop", logprobs)
                return
            text += self.tokenizer.decode([token])
            hits = [i for i in (text.find(s, max(0, sent - longest_stop)) for s in params.stop) if i >= 0]
            if hits:
                yield self._out(request_id, prompt, generated, text[sent : min(hits)], (token,), "stop", logprobs)
                return
            if len(generated) >= params.max_tokens:
                yield self._out(request_id, prompt, generated, text[sent:], (token,), "length", logprobs)
                return
            hold = max((k for s in params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            delta, sent = text[sent : len(text) - hold], max(sent, len(text) - hold)
            yield self._out(request_id, prompt, generated, delta, (token,), None, logprobs)

    async def _replay(self, request_id: str, prompt: list[int], reply: str) -> AsyncIterator[RequestOutput]:
        tokens = self.tokenizer.encode(reply, add_special_tokens=False)
        for k, token in enumerate(tokens):
            await asyncio.sleep(self.step_delay_s)
            if request_id in self._aborts:
                yield self._out(request_id, prompt, tokens[:k], "", (), "cancelled", None)
                return
            self.generation_tokens_total += 1
            text = self.tokenizer.decode([token], skip_special_tokens=True)
            last = k == len(tokens) - 1
            yield self._out(request_id, prompt, tokens[: k + 1], text, (token,), "stop" if last else None, None)

    def _logprobs(self, token: int, step: int, params: SamplingParams) -> tuple[TokenLogprob, ...] | None:
        if params.logprobs is None:
            return None
        rng = random.Random(token * 100_003 + step)  # its own generator: asking for logprobs changes no token
        decode = self.tokenizer.decode
        lp = math.log(rng.uniform(0.05, 0.95))
        others = rng.sample(self._vocab, params.logprobs)
        top = tuple(TopLogprob(t, decode([t]), lp - i * 0.5) for i, t in enumerate([token] + others))
        return (TokenLogprob(token, decode([token]), lp, top[: params.logprobs]),)

    def _out(
        self,
        request_id: str,
        prompt: list[int],
        generated: list[int],
        text: str,
        token_ids: tuple[int, ...],
        finish_reason: str | None,
        logprobs: tuple[TokenLogprob, ...] | None,
        error: str | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id,
            text,
            token_ids,
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            logprobs=logprobs,
            prompt_tokens=len(prompt),
            completion_tokens=len(generated),
            error=error,
        )
