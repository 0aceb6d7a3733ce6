"""Where a lone request's time to first token goes behind the HTTP server, stage by stage (issue 17).

    python -m bench.diag.ttft_stages [--workdir /tmp/w] [--kv-cache int4] [--prompt 170] [--repeats 9] [--text]
    OMP_NUM_THREADS=1 python -m bench.diag.ttft_stages --stand-in [--gpu-ms 14] [--prefill-host-ms 0]

The server (`bench.serve_overhead.ServerThread`: the app, uvicorn and AsyncEngine) around the random 7B
checkpoint on CUDA, as `bench.serve_gap` builds it, or with `--stand-in` around `bench.serve_overhead`'s
SleepRunner on CPU. A client in a child process sends `--repeats` + 2 streamed completions one after the
other (the first 2 dropped: warm-up), a `--prompt`-token prompt as token ids (as bench.serve_gap's TTFT;
`--text`: as text, tokenized by the server), max_tokens 1, and reads each to `[DONE]`. Timestamps are taken
in the server process at each stage by wrapping the functions named below (this process only) and in the
client; `time.perf_counter` is the system's monotonic clock, so both processes' stamps share one origin.
Reported: per stage the median ms since the client sent the request, and the step's own time. The same
prompt's TTFT on the engine alone (EngineCore.step in this thread) is printed for reference.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import torch

# (stage, what marks it), in the order a request passes them
STAGES = [
    ("client_send", "client: request about to be sent (httpx)"),
    ("bytes_in", "server: first bytes of the request (h11 protocol data_received)"),
    ("asgi", "server: the app called (outermost ASGI)"),
    ("route", "server: the route handler runs (body parsed, validated)"),
    ("encode_start", "server: tokenizing, worker thread (text prompts only)"),
    ("encode_end", "server: tokenized"),
    ("submit", "server: AsyncEngine.submit (event loop)"),
    ("engine_took", "engine thread: took the request in"),
    ("step_start", "engine thread: EngineCore.step begins"),
    ("step_end", "engine thread: EngineCore.step returns"),
    ("deliver", "event loop: outputs handed to their queues"),
    ("started", "event loop: ChoiceStreams.start returned (first output of every choice)"),
    ("response_start", "server: http.response.start sent to uvicorn"),
    ("first_data", "server: the first data event sent to uvicorn"),
    ("client_first_data", "client: the first data line read"),
]


class Stamps:
    """Times per stage, in this process; the request a stamp belongs to is found by time afterwards."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)

    def mark(self, stage: str) -> None:
        self.times[stage].append(time.perf_counter())

    def first_within(self, stage: str, lo: float, hi: float) -> float | None:
        return next((t for t in self.times[stage] if lo <= t <= hi), None)


def _wrap(owner: Any, name: str, before: str | None, after: str | None, stamps: Stamps) -> None:
    """Replace `owner.name` by a function that stamps `before` and `after` it runs."""
    fn = getattr(owner, name)
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapped_async(*args, **kwargs):
            if before:
                stamps.mark(before)
            out = await fn(*args, **kwargs)
            if after:
                stamps.mark(after)
            return out

        setattr(owner, name, wrapped_async)
        return

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if before:
            stamps.mark(before)
        out = fn(*args, **kwargs)
        if after:
            stamps.mark(after)
        return out

    setattr(owner, name, wrapped)


def instrument(stamps: Stamps) -> None:
    """Wrap the server's stages (classes of this process only; call before the server is built)."""
    import athena_runtime.engine as engine
    import server.h11_timeouts as h11_timeouts
    import server.prompt_encoder as prompt_encoder
    import server.serving as serving
    import server.serving_chat as serving_chat
    import server.serving_completions as serving_completions

    proto = h11_timeouts.HeaderTimeoutH11Protocol
    data_received = proto.data_received

    def stamped_data_received(self, data: bytes) -> None:
        if data[:5] == b"POST ":
            stamps.mark("bytes_in")
        data_received(self, data)

    proto.data_received = stamped_data_received
    _wrap(serving_completions.CompletionServing, "create", "route", None, stamps)
    _wrap(serving_chat.ChatServing, "create", "route", None, stamps)
    _wrap(prompt_encoder.PromptEncoder, "_encode", "encode_start", "encode_end", stamps)
    _wrap(prompt_encoder.PromptEncoder, "_encode_rendered", "encode_start", "encode_end", stamps)
    _wrap(engine.AsyncEngine, "submit", "submit", None, stamps)
    _wrap(engine.EngineCore, "add_request", "engine_took", None, stamps)
    _wrap(engine.EngineCore, "step", "step_start", "step_end", stamps)
    _wrap(engine.AsyncEngine, "_deliver", "deliver", None, stamps)
    _wrap(serving.ChoiceStreams, "start", None, "started", stamps)


class StampedApp:
    """The app with the response's start and its first data event stamped."""

    def __init__(self, app: Any, stamps: Stamps) -> None:
        self.app, self.stamps = app, stamps

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.stamps.mark("asgi")
        first = True

        async def stamped_send(message) -> None:
            nonlocal first
            if message["type"] == "http.response.start":
                self.stamps.mark("response_start")
            elif message["type"] == "http.response.body" and first and message.get("body", b"").startswith(b"data:"):
                first = False
                self.stamps.mark("first_data")
            await send(message)

        await self.app(scope, receive, stamped_send)


def client(url: str, prompt_len: int, vocab: int, repeats: int, text: bool) -> list[dict]:
    """Sequential streamed completions; per request the send and first-data times (perf_counter)."""
    import httpx

    g = torch.Generator().manual_seed(172)
    out = []
    with httpx.Client(timeout=60) as http:
        for _ in range(repeats):
            ids = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
            prompt = " ".join(f"w{t}" for t in ids[: max(1, prompt_len // 2)]) if text else ids
            body = {"model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
            sent = time.perf_counter()
            first = None
            with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter()
            out.append({"client_send": sent, "client_first_data": first})
            time.sleep(0.05)  # the server idle again, as a lone request finds it
    return out


def build(args: argparse.Namespace) -> tuple[Any, Any, int, Any]:
    """(runner, tokenizer, vocab, settings)"""
    from athena_runtime.engine_settings import EngineSettings

    if args.stand_in:
        from bench.engine_overhead import load_tokenizer
        from bench.serve_overhead import SleepRunner

        tokenizer, vocab = load_tokenizer(args.tokenizer)
        runner = SleepRunner(vocab, 256, 4, args.gpu_ms, 0.0, args.prefill_host_ms, args.gpu_ms_per_prompt_token)
    else:
        from athena_runtime.model_runner import ModelRunner
        from bench.random_checkpoint import open_checkpoint

        ckpt, tokenizer, vocab = open_checkpoint(args.workdir)
        runner = ModelRunner.from_path(
            ckpt, kv_format=args.kv_cache, block_size=16, num_blocks=256, device="cuda", max_model_len=4096
        )
        runner.capture_graphs(4)
    settings = EngineSettings(
        kv_cache=args.kv_cache, max_num_seqs=4, num_blocks=runner.num_blocks, max_queue=64, prefix_cache=False
    )
    return runner, tokenizer, vocab, settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/w")
    ap.add_argument("--kv-cache", default="int4")
    ap.add_argument("--prompt", type=int, default=170)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--text", action="store_true", help="send the prompt as text (the server tokenizes it)")
    ap.add_argument("--stand-in", action="store_true", help="CPU: bench.serve_overhead's SleepRunner, no model")
    ap.add_argument("--gpu-ms", type=float, default=14.0, help="--stand-in: sleep per step")
    ap.add_argument("--prefill-host-ms", type=float, default=0.0, help="--stand-in: host-bound ms of a prompt step")
    ap.add_argument("--gpu-ms-per-prompt-token", type=float, default=0.0, help="--stand-in: sleep per prompt token")
    ap.add_argument("--tokenizer", default="bpe32k", help="--stand-in: bpe32k or smollm2")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)  # the child's role
    ap.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        print(json.dumps(client(args.client, args.prompt, args.vocab, args.repeats, args.text)))
        return 0
    logging.basicConfig(level=logging.WARNING)
    if args.stand_in:
        args.kv_cache = "fp16"
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("without CUDA: --stand-in (the CPU stand-in)")
    from athena_runtime.engine import AsyncEngine, EngineCore
    from bench.serve_overhead import ServerThread
    from bench.ttft_client import engine_ttft_ms

    runner, tokenizer, vocab, settings = build(args)
    core = EngineCore(runner, tokenizer, settings, eos_token_ids=())
    engine_ttft_ms(core, args.prompt, vocab, 3)
    engine_alone = statistics.median(engine_ttft_ms(core, args.prompt, vocab, args.repeats))
    del core
    stamps = Stamps()
    instrument(stamps)
    engine = AsyncEngine(runner, tokenizer, settings, "bench", eos_token_ids=())
    server = ServerThread(engine, None)
    server.server.config.app = StampedApp(server.app, stamps)  # the config loads its app when serving starts
    with server:
        cmd = [sys.executable, "-m", "bench.diag.ttft_stages", "--client", server.url, "--vocab", str(vocab)]
        cmd += ["--prompt", str(args.prompt), "--repeats", str(args.repeats + 2)] + (["--text"] if args.text else [])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the client exited {done.returncode}: {done.stderr[-2000:]}")
    requests = json.loads(done.stdout.strip().splitlines()[-1])[2:]
    rows: dict[str, list[float]] = defaultdict(list)
    steps_before_first_data = []
    for r in requests:
        lo, hi = r["client_send"], r["client_first_data"]
        for stage, _ in STAGES:
            t = r.get(stage) if stage.startswith("client") else stamps.first_within(stage, lo, hi)
            if t is not None:
                rows[stage].append(1e3 * (t - lo))
        steps_before_first_data.append(len([t for t in stamps.times["step_start"] if lo <= t <= hi]))
    medians = {stage: statistics.median(v) for stage, v in rows.items()}
    device = "CPU stand-in" if args.stand_in else torch.cuda.get_device_name()
    print(
        f"{device}: a {args.prompt}-token prompt ({'text' if args.text else 'token ids'}), max_tokens 1, "
        f"median of {len(requests)} lone requests, ms since the client sent it"
    )
    print(f"{'stage':18s} {'at ms':>8s} {'+ms':>7s}  what")
    prev = 0.0
    for stage, what in STAGES:
        if stage in medians:
            print(f"{stage:18s} {medians[stage]:8.2f} {medians[stage] - prev:7.2f}  {what}")
            prev = medians[stage]
    step = statistics.median(
        [b - a for a, b in zip(rows["step_start"], rows["step_end"])] if rows["step_start"] else [float("nan")]
    )
    print(f"model steps before the first data event: {sorted(set(steps_before_first_data))}")
    print(
        f"TTFT: engine alone {engine_alone:.1f} ms; behind the server {medians['client_first_data']:.1f} ms, of which "
        f"the step {step:.1f} ms and {medians['client_first_data'] - step:.1f} ms outside it"
    )
    if args.json:
        print(json.dumps({"device": device, "args": vars(args), "engine_alone_ms": engine_alone, "stages_ms": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
