"""Host-side cost of one engine step at N concurrent decode streams, on CPU, without a model.

    OMP_NUM_THREADS=1 python -m bench.engine_overhead [--streams 64] [--steps 200] [--cases smollm2:default,...]
                                                      [--profile] [--async-engine] [--json]
    python -m bench.engine_overhead --checkpoint /tmp/w/llama7b-athena --steps 60 --cases x:greedy,x:default

`EngineCore` (scheduler, chunks, sampler, detokenizer, stop strings, outputs) drives a `HostRunner`:
ModelRunner's host work on the CUDA-graph decode path (`check_chunks`, then `_fill` building the
static input buffers, here on CPU) followed by random float32 logits [n, vocab] returned at once
from a pool made up front. What is left is the Python work that runs serially with the GPU.

Cases are tokenizer:sampling. Tokenizers: `smollm2` (the embedded SmolLM2 tokenizer, vocab 49152)
and `bpe32k` (bench.random_checkpoint's byte-level BPE stand-in with logits over 32000 ids, as the
7B-shaped `bench.engine` run uses). Sampling: `default` (temperature 1, top_p 1) or `greedy`.
Reported: median / p90 ms per decode step; with --profile, cProfile's cumulative ms per step of the
step's parts (inflated by the profiler; compare the parts, not the totals); `_fill` alone.
Note: on CPU the sampler's tensor ops do their arithmetic here; on the GPU they are launches.

With --checkpoint (CUDA): the real ModelRunner (fp16 KV, CUDA graphs) under the same engine: the
eager prefill/mixed steps that admit the streams (timed with a device sync each), then the median
decode step and its profile, where `.tolist()` (the sampled ids to the host) is the wait for the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from athena_runtime.batch import SequenceChunk, check_chunks
from athena_runtime.engine import AsyncEngine, EngineCore
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.model_runner import GRAPH_BUCKETS, ModelRunner
from athena_runtime.sampling_params import SamplingParams

PROMPT_LEN = 128
BLOCK_SIZE = 16
MAX_MODEL_LEN = 4096
# (file name, function name), label: cProfile's cumulative time of that function (the largest, when
# several functions of the file share the name: the outermost, e.g. TextStream.add)
PARTS = [
    (("engine.py", "step"), "EngineCore.step (total)"),
    (("scheduler.py", "schedule"), "Scheduler.schedule"),
    (("engine_overhead.py", "execute"), "runner host work (check_chunks + _fill)"),
    (("model_runner.py", "execute"), "ModelRunner.execute (check_chunks, _fill, replay)"),
    (("batch.py", "check_chunks"), "  check_chunks"),
    (("model_runner.py", "_fill"), "  ModelRunner._fill"),
    (("scheduler.py", "advance"), "Scheduler.advance"),
    (("sampler.py", "__call__"), "Sampler"),
    (("engine.py", "_append"), "EngineCore._append (all sequences)"),
    (("stop_strings.py", "add"), "  TextStream.add (detokenizer + stop strings)"),
    (("tokenization_utils_base.py", "decode"), "    tokenizer.decode (transformers)"),
    (("token_decoder.py", "_decode_bytes"), "    TokenDecoder byte table"),
    (("token_decoder.py", "_decode_backend"), "    TokenDecoder tokenizers backend"),
    (("engine.py", "_output"), "  RequestOutput"),
]


class HostRunner:
    """ModelRunner's host-side decode work on CPU plus instant random logits."""

    def __init__(self, vocab_size: int, num_blocks: int, max_batch: int, seed: int = 0) -> None:
        self.vocab_size, self.num_blocks, self.block_size = vocab_size, num_blocks, BLOCK_SIZE
        self.max_model_len = MAX_MODEL_LEN
        self.graphs = graph_buffers(num_blocks, max_batch)
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(4, max(max_batch, 256), vocab_size, generator=g) * 3.0
        self.calls = 0

    def execute(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        check_chunks(chunks, self.block_size, self.num_blocks)
        if all(len(c.token_ids) == 1 for c in chunks):
            self.graphs._fill(chunks, self.graphs._bucket(len(chunks)))
        self.calls += 1
        return self.pool[self.calls % len(self.pool), : len(chunks)]


def graph_buffers(num_blocks: int, max_batch: int) -> ModelRunner:
    """A ModelRunner holding only its CUDA-graph input buffers (on CPU), for `_fill`."""
    r = ModelRunner.__new__(ModelRunner)
    r.device, r.block_size, r.num_blocks, r.max_model_len = torch.device("cpu"), BLOCK_SIZE, num_blocks, MAX_MODEL_LEN
    r.kv_cache = SimpleNamespace(null_block=num_blocks, block_size=BLOCK_SIZE)
    r.graph_buckets = tuple(b for b in GRAPH_BUCKETS if b < 2 * max_batch)
    r._init_graph_buffers()
    return r


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "smollm2":
        from quantize.embedded import reference_model_path

        tok = AutoTokenizer.from_pretrained(str(reference_model_path()))
        return tok, len(tok)
    if name == "bpe32k":
        from bench.random_checkpoint import _tokenizer

        with tempfile.TemporaryDirectory() as d:
            _tokenizer(Path(d), 32000)
            return AutoTokenizer.from_pretrained(d), 32000
    raise SystemExit(f"unknown tokenizer {name!r} (smollm2, bpe32k)")


def params_for(sampling: str, max_tokens: int) -> SamplingParams:
    if sampling == "default":
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    if sampling == "greedy":
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    raise SystemExit(f"unknown sampling {sampling!r} (default, greedy)")


def make_core(tokenizer, vocab: int, streams: int, steps: int, sampling: str, seed: int = 0) -> EngineCore:
    blocks = streams * -(-(PROMPT_LEN + steps + 64) // BLOCK_SIZE) + 8
    runner = HostRunner(vocab, blocks, streams, seed)
    settings = EngineSettings(max_num_seqs=streams, max_num_batched_tokens=max(2048, streams), num_blocks=blocks)
    core = EngineCore(runner, tokenizer, settings, eos_token_ids=())
    g = torch.Generator().manual_seed(seed)
    params = params_for(sampling, steps + 32)
    for i in range(streams):
        core.add_request(f"r{i}", torch.randint(3, len(tokenizer), (PROMPT_LEN,), generator=g).tolist(), params)
    while any(s.num_computed < s.num_tokens - 1 for s in core.scheduler.requests.values()) or core.scheduler.waiting:
        core.step()  # prefill
    for _ in range(5):
        core.step()  # warm-up decodes
    return core


def time_steps(core: EngineCore, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = core.step()
        times.append(1e3 * (time.perf_counter() - t0))
        assert outs and not any(o.finished for o in outs), "a stream finished inside the timed window"
    return times


def profile_steps(core: EngineCore, steps: int) -> dict[str, float]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        core.step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    found: dict[str, float] = {}
    own, torch_ms, torch_calls = None, 0.0, 0.0
    for (file, _line, func), (_cc, calls, tottime, cum, _callers) in stats.items():
        if file.endswith("engine.py") and func == "step":
            own = 1e3 * tottime / steps
        if file == "~" and "torch" in func:  # a torch builtin: dispatch + (on CPU) the arithmetic
            torch_ms += 1e3 * tottime / steps
            torch_calls += calls / steps
        for (fname, fn), label in PARTS:
            if file.endswith(fname) and func == fn:
                found[label] = max(found.get(label, 0.0), 1e3 * cum / steps)
        if file == "~" and "'tolist'" in func:  # on CUDA: where the step waits for the GPU
            found["  of which .tolist() (on CUDA: waiting for the GPU)"] = 1e3 * tottime / steps
    out = {}
    for _, label in PARTS:
        if label in found:
            out[label] = found[label]
        if label == "Sampler":
            out.update({k: v for k, v in found.items() if "tolist" in k})
    if own is not None:  # (python 3.12's cProfile on the GPU machine did not list `step`)
        out["EngineCore.step's own lines"] = own
    out[f"torch calls ({torch_calls:.0f} per step; on CPU incl. arithmetic)"] = torch_ms
    return out


def time_fill(streams: int, repeats: int = 2000) -> dict[str, float]:
    """`check_chunks` + `_fill` for `streams` decode chunks at ~200 tokens of context."""
    blocks = streams * 16 + 8
    r = graph_buffers(blocks, streams)
    chunks = [SequenceChunk([5], 200 + i % 16, list(range(i * 16, i * 16 + 14))) for i in range(streams)]
    out = {}
    for name, fn in (
        ("check_chunks", lambda: check_chunks(chunks, BLOCK_SIZE, blocks)),
        ("_fill", lambda: r._fill(chunks, r._bucket(streams))),
    ):
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeats // 5):
                fn()
            samples.append(1e3 * (time.perf_counter() - t0) / (repeats // 5))
        out[name] = statistics.median(samples)
    return out


def gpu_case(runner, tokenizer, streams: int, steps: int, sampling: str) -> dict:
    """The real runner on CUDA: eager prefill/mixed step times, then decode steps (CUDA graphs)."""
    settings = EngineSettings(
        max_num_seqs=streams, max_num_batched_tokens=max(2048, streams), num_blocks=runner.num_blocks
    )
    core = EngineCore(runner, tokenizer, settings, eos_token_ids=())
    g = torch.Generator().manual_seed(0)
    for i in range(streams):
        prompt = torch.randint(3, runner.config.vocab_size, (PROMPT_LEN,), generator=g).tolist()
        core.add_request(f"{sampling}{i}", prompt, params_for(sampling, 2 * steps + 32))
    prefill = []
    while any(s.num_computed < s.num_tokens - 1 for s in core.scheduler.requests.values()) or core.scheduler.waiting:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        core.step()
        torch.cuda.synchronize()
        prefill.append(1e3 * (time.perf_counter() - t0))
    for _ in range(10):
        core.step()  # captures the decode graph
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        core.step()
        times.append(1e3 * (time.perf_counter() - t0))
    return {
        "vocab": runner.config.vocab_size,
        "median_ms": statistics.median(times),
        "p90_ms": statistics.quantiles(times, n=10)[-1],
        "prefill_steps_ms": prefill,
        "profile_ms": profile_steps(core, steps),
    }


def async_ms_per_step(tokenizer, vocab: int, streams: int, steps: int, sampling: str) -> float:
    """Wall ms per step through AsyncEngine (step thread + asyncio delivery to `streams` consumers)."""
    blocks = streams * -(-(PROMPT_LEN + steps + 64) // BLOCK_SIZE) + 8
    runner = HostRunner(vocab, blocks, streams)
    settings = EngineSettings(max_num_seqs=streams, max_num_batched_tokens=max(2048, streams), num_blocks=blocks)
    engine = AsyncEngine(runner, tokenizer, settings, "bench", eos_token_ids=())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tokenizer), (PROMPT_LEN,), generator=g).tolist() for _ in range(streams)]
    params = params_for(sampling, steps)

    async def consume(i: int, first: list[float]) -> None:
        async for out in engine.generate(f"r{i}", prompts[i], params):
            if out.token_ids and not first[i]:
                first[i] = time.perf_counter()

    async def main() -> float:
        await engine.start()
        first = [0.0] * streams
        await asyncio.gather(*(consume(i, first) for i in range(streams)))
        end = time.perf_counter()
        await engine.shutdown()
        return 1e3 * (end - max(first)) / (steps - 1)

    return asyncio.run(main())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="fresh engines per case; the median is over all steps")
    ap.add_argument("--cases", default="smollm2:default,smollm2:greedy,bpe32k:default,bpe32k:greedy")
    ap.add_argument("--profile", action="store_true", help="cProfile breakdown per case")
    ap.add_argument("--async-engine", action="store_true", help="also time steps through AsyncEngine")
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="a compressed checkpoint: run its model on CUDA instead "
        "(e.g. bench.random_checkpoint's 7B); only the sampling part of each case is used",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tokenizers: dict[str, tuple] = {}
    result: dict = {"streams": args.streams, "steps": args.steps, "fill": time_fill(args.streams), "cases": {}}
    if args.checkpoint:
        from transformers import AutoTokenizer

        blocks = args.streams * -(-(PROMPT_LEN + 2 * args.steps + 64) // BLOCK_SIZE) + 8
        runner = ModelRunner.from_path(
            args.checkpoint,
            kv_format="fp16",
            block_size=BLOCK_SIZE,
            num_blocks=blocks,
            device="cuda",
            max_model_len=MAX_MODEL_LEN,
        )
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        for sampling in dict.fromkeys(case.split(":")[-1] for case in args.cases.split(",")):
            result["cases"][f"{Path(args.checkpoint).name}:{sampling}"] = gpu_case(
                runner, tokenizer, args.streams, args.steps, sampling
            )
    for case in [] if args.checkpoint else args.cases.split(","):
        tok_name, sampling = case.split(":")
        if tok_name not in tokenizers:
            tokenizers[tok_name] = load_tokenizer(tok_name)
        tok, vocab = tokenizers[tok_name]
        times = []
        for rep in range(args.repeats):
            times += time_steps(make_core(tok, vocab, args.streams, args.steps, sampling, seed=rep), args.steps)
        row = {"vocab": vocab, "median_ms": statistics.median(times), "p90_ms": statistics.quantiles(times, n=10)[-1]}
        if args.profile:
            row["profile_ms"] = profile_steps(make_core(tok, vocab, args.streams, args.steps, sampling), args.steps)
        if args.async_engine:
            row["async_ms"] = async_ms_per_step(tok, vocab, args.streams, args.steps, sampling)
        result["cases"][case] = row
    where = (
        f"1 engine per case, {torch.cuda.get_device_name()}"
        if args.checkpoint
        else f"{args.repeats} engines per case, CPU, 1 thread"
    )
    print(f"{args.streams} streams, {args.steps} decode steps, {where}")
    print("runner host work alone: " + ", ".join(f"{k} {v:.3f} ms" for k, v in result["fill"].items()))
    for case, row in result["cases"].items():
        extra = f", AsyncEngine {row['async_ms']:.2f} ms/step" if "async_ms" in row else ""
        print(
            f"{case:16s} vocab {row['vocab']:6d}: median {row['median_ms']:.2f} ms/step, p90 {row['p90_ms']:.2f}{extra}"
        )
        if "prefill_steps_ms" in row:
            print(
                "    eager prefill/mixed steps before the decode steps: "
                + ", ".join(f"{ms:.0f}" for ms in row["prefill_steps_ms"])
                + " ms"
            )
        for label, ms in row.get("profile_ms", {}).items():
            print(f"    {label:42s} {ms:7.2f} ms/step (cProfile)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
