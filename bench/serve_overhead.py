"""What the serving layer costs per token, on CPU: the same engine alone and behind the HTTP server.

    OMP_NUM_THREADS=1 python -m bench.serve_overhead [--streams 1,64] [--new 128] [--prompt 128]
        [--gpu-ms 4.0 --gpu-ms-per-seq 0.2] [--prefill-host-ms 0 --gpu-ms-per-prompt-token 0]
        [--ttft-prompt 170] [--tokenizer bpe32k] [--repeats 1] [--profile FILE] [--json]

The model is `bench.engine_overhead.HostRunner` (ModelRunner's host work, instant random logits)
plus a sleep standing for the GPU's share of a step (`--gpu-ms` + `--gpu-ms-per-seq` x sequences,
GIL released as a CUDA sync releases it; the default 4.0 + 0.2 x n is about the 7B shape on an H200:
TPOT 4.1 ms at 1 stream, ~17 ms a step at 64). On the GPU a step that feeds prompt tokens is bound by
the host (the eager forward's launches: BENCHMARKS.md §7, 76.8 ms wall for 19.8 ms of kernels at 170
tokens): `--prefill-host-ms` stands for that host work (GIL taken and released per stand-in launch) and
`--gpu-ms-per-prompt-token` for the kernels' share per prompt token. Per level:
- engine alone: `bench.engine.run_level` driving `EngineCore` (no threads, no asyncio, no HTTP);
- server: `athena serve`'s app and uvicorn on 127.0.0.1 around `AsyncEngine` on the same runner,
  loaded by `athena bench serve` in a child process (streaming completions, the same prompt and
  output lengths), so that the client does not share the server's interpreter.
Reported: output tok/s of both and their ratio, the engine's ms per token (TPOT) and the server's
ITL p50 / TPOT p50 / TTFT p50, and the lone-prompt TTFT of both measured as `bench.serve_gap` does
(a `--ttft-prompt`-token prompt as token ids, max_tokens 1, on the idle engine / server).
`--profile FILE` writes cProfile stats of the server's event-loop thread.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import torch

from athena_runtime.batch import SequenceChunk
from athena_runtime.engine import AsyncEngine, EngineCore
from athena_runtime.engine_settings import EngineSettings
from bench.engine import run_level
from bench.engine_overhead import BLOCK_SIZE, HostRunner, load_tokenizer
from bench.ttft_client import engine_ttft_ms, server_ttft_in_child


class SleepRunner(HostRunner):
    """HostRunner plus a sleep for the GPU's part of each step (no GIL held, as in a CUDA sync).

    A step that feeds prompt tokens also costs `prefill_host_ms` of host work (the eager forward's
    launches: on the GPU a prefill step is bound by the host) done as that many milliseconds' worth of
    tiny torch ops, each of which lets go of the GIL and takes it back as a launch does (so another
    thread that wants the GIL slows it down as it would the real one), plus `gpu_ms_per_prompt_token`
    of sleep per prompt token fed."""

    def __init__(
        self,
        vocab_size: int,
        num_blocks: int,
        max_batch: int,
        gpu_ms: float,
        gpu_ms_per_seq: float,
        prefill_host_ms: float = 0.0,
        gpu_ms_per_prompt_token: float = 0.0,
    ) -> None:
        super().__init__(vocab_size, num_blocks, max_batch)
        self.gpu_ms, self.gpu_ms_per_seq = gpu_ms, gpu_ms_per_seq
        self.gpu_ms_per_prompt_token = gpu_ms_per_prompt_token
        self._scratch = torch.zeros(8)
        self.prefill_ops = round(prefill_host_ms / self._op_ms()) if prefill_host_ms > 0 else 0

    def _op_ms(self) -> float:
        """Milliseconds of one stand-in launch, uncontended (the best of a few timings)."""
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(2000):
                self._scratch.add_(1.0)
            best = min(best, (time.perf_counter() - t0) / 2000 * 1e3)
        return best

    def execute(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        logits = super().execute(chunks)
        prompt_tokens = sum(len(c.token_ids) for c in chunks if len(c.token_ids) > 1)
        if prompt_tokens:
            for _ in range(self.prefill_ops):
                self._scratch.add_(1.0)
        time.sleep(
            1e-3 * (self.gpu_ms + self.gpu_ms_per_seq * len(chunks) + self.gpu_ms_per_prompt_token * prompt_tokens)
        )
        return logits


def make_runner(args: argparse.Namespace, vocab: int, streams: int) -> SleepRunner:
    blocks = 2 * streams * -(-(args.prompt + args.new + 64) // BLOCK_SIZE) + 8
    return SleepRunner(
        vocab, blocks, streams, args.gpu_ms, args.gpu_ms_per_seq, args.prefill_host_ms, args.gpu_ms_per_prompt_token
    )


def settings_for(runner: SleepRunner, streams: int, prefill_chunk: int | None) -> EngineSettings:
    return EngineSettings(
        max_num_seqs=streams,
        max_num_batched_tokens=max(2048, streams),
        num_blocks=runner.num_blocks,
        max_queue=max(64, streams),
        prefix_cache=False,
        prefill_chunk_tokens=prefill_chunk,
    )


def engine_level(args: argparse.Namespace, tokenizer: Any, vocab: int, streams: int) -> dict:
    runner = make_runner(args, vocab, streams)
    core = EngineCore(runner, tokenizer, settings_for(runner, streams, args.prefill_chunk), eos_token_ids=())
    run_level(core, min(streams, 2), args.prompt, 4, vocab, seed=99)  # warm-up
    engine_ttft_ms(core, args.ttft_prompt, vocab, 2)
    ttft = statistics.median(engine_ttft_ms(core, args.ttft_prompt, vocab, args.ttft_repeats))
    return run_level(core, streams, args.prompt, args.new, vocab, seed=streams) | {"lone_ttft_ms": ttft}


class ServerThread:
    """The server's app and uvicorn (server/http_server.py) on a free 127.0.0.1 port, in a thread."""

    def __init__(self, engine: AsyncEngine, profile: cProfile.Profile | None) -> None:
        from server.app import create_app
        from server.http_server import AppServer, uvicorn_config
        from server.settings import ServerSettings

        settings = ServerSettings(api_key=None, log_level="warning", max_queue=engine.max_queue)
        self.app = create_app(settings, engine=engine)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = AppServer(uvicorn_config(self.app, settings, access_log=False), self.app)
        self.loop = asyncio.new_event_loop()
        self.profile = profile
        self.thread = threading.Thread(target=self._run, name="server", daemon=True)

    def _run(self) -> None:
        serve = lambda: self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))  # noqa: E731
        if self.profile is None:
            serve()
        else:
            self.profile.runcall(serve)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self.server.begin_shutdown)
        self.thread.join(30)
        self.sock.close()


def server_level(
    args: argparse.Namespace, tokenizer: Any, vocab: int, streams: int, profile: cProfile.Profile | None
) -> dict:
    runner = make_runner(args, vocab, streams)
    engine = AsyncEngine(
        runner, tokenizer, settings_for(runner, streams, args.prefill_chunk), "bench", eos_token_ids=()
    )
    with ServerThread(engine, profile) as server:
        client = [
            sys.executable,
            "-m",
            "server.cli",
            "bench",
            "serve",
            "--base-url",
            server.url,
            "--model",
            "bench",
            "--endpoint",
            "completions",
            "--concurrency",
            str(streams),
            "--num-prompts",
            str(streams),
            "--input-len",
            str(args.prompt),
            "--output-len",
            str(args.new),
            "--no-progress",
            "--json",
            "--extra-body",
            '{"temperature": 0}',
        ]  # greedy, as bench.engine.run_level samples
        warm = client[: client.index("--concurrency")] + [
            "--concurrency",
            "2",
            "--num-prompts",
            "2",
            "--output-len",
            "4",
            "--no-progress",
            "--json",
        ]
        subprocess.run(warm, check=True, capture_output=True, text=True, timeout=300)
        # (the first 2 of the child's requests warm its client up: dropped)
        ttft = server_ttft_in_child(server.url, "bench", args.ttft_prompt, vocab, args.ttft_repeats + 2)[2:]
        done = subprocess.run(client, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"athena bench serve exited {done.returncode}: {done.stderr[-2000:]}")
    level = json.loads(done.stdout.strip().splitlines()[-1])["levels"][0]
    return level | {"lone_ttft_ms": statistics.median(ttft)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--gpu-ms", type=float, default=4.0, help="stand-in GPU time of every step")
    ap.add_argument("--gpu-ms-per-seq", type=float, default=0.2, help="plus this much per sequence in the step")
    ap.add_argument(
        "--prefill-host-ms",
        type=float,
        default=0.0,
        help="host-bound time (GIL taken and released per stand-in launch) of every step that feeds prompt tokens",
    )
    ap.add_argument("--gpu-ms-per-prompt-token", type=float, default=0.0, help="stand-in GPU time per prompt token fed")
    ap.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prompt tokens a step while others decode (default: the engine's for the CPU)",
    )
    ap.add_argument("--ttft-prompt", type=int, default=170, help="a lone prompt of this many token ids: its TTFT")
    ap.add_argument("--ttft-repeats", type=int, default=7, help="of the lone prompt (median reported)")
    ap.add_argument("--tokenizer", default="bpe32k", help="bpe32k (the 7B stand-in's) or smollm2")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each level (medians reported)")
    ap.add_argument("--profile", default=None, help="write cProfile stats of the server's event loop thread here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    tokenizer, vocab = load_tokenizer(args.tokenizer)
    profile = cProfile.Profile() if args.profile else None
    rows = []
    for streams in (int(s) for s in args.streams.split(",")):
        for rep in range(args.repeats):
            eng = engine_level(args, tokenizer, vocab, streams)
            srv = server_level(args, tokenizer, vocab, streams, profile)
            rows.append(
                {
                    "streams": streams,
                    "repeat": rep,
                    "engine_tok_s": eng["tok_s"],
                    "engine_ms_per_token": eng["per_token_ms"],
                    "server_tok_s": srv["output_tokens_per_s"],
                    "server_tpot_p50_ms": srv["tpot_ms"]["p50"],
                    "server_itl_p50_ms": srv["itl_ms"]["p50"],
                    "server_ttft_p50_ms": srv["ttft_ms"]["p50"],
                    "engine_lone_ttft_ms": eng["lone_ttft_ms"],
                    "server_lone_ttft_ms": srv["lone_ttft_ms"],
                    "server_errors": srv.get("failed", 0),
                }
            )
    if profile is not None:
        profile.dump_stats(args.profile)
    print(
        f"CPU ({os.cpu_count()} cores), tokenizer {args.tokenizer}, prompt {args.prompt}, {args.new} new tokens, "
        f"stand-in GPU {args.gpu_ms} + {args.gpu_ms_per_seq} x n ms per step"
        + (f" + {args.gpu_ms_per_prompt_token} ms per prompt token" if args.gpu_ms_per_prompt_token else "")
        + (f", {args.prefill_host_ms} ms host-bound per step with prompt tokens" if args.prefill_host_ms else "")
    )
    print(f"lone TTFT: a {args.ttft_prompt}-token prompt (ids, max_tokens 1), median of {args.ttft_repeats}")
    print(
        f"{'streams':>7s} {'engine tok/s':>12s} {'server tok/s':>12s} {'ratio':>6s} {'engine ms/tok':>13s} "
        f"{'server ITL p50':>14s} {'TPOT p50':>8s} {'ITL/engine':>10s} {'TTFT p50':>8s} "
        f"{'lone TTFT: engine':>17s} {'server':>6s}"
    )
    for r in rows:
        print(
            f"{r['streams']:7d} {r['engine_tok_s']:12.1f} {r['server_tok_s']:12.1f} "
            f"{r['server_tok_s'] / r['engine_tok_s']:6.2f} {r['engine_ms_per_token']:13.2f} "
            f"{r['server_itl_p50_ms']:14.2f} {r['server_tpot_p50_ms']:8.2f} "
            f"{r['server_itl_p50_ms'] / r['engine_ms_per_token']:10.2f} {r['server_ttft_p50_ms']:8.1f} "
            f"{r['engine_lone_ttft_ms']:17.1f} {r['server_lone_ttft_ms']:6.1f}"
        )
    if args.json:
        print(json.dumps({"rows": rows, "args": vars(args)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
