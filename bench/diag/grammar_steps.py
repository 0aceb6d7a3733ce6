"""What a JSON schema on every request costs the engine: mean decode-step wall time of N streams on the
embedded model (or MODEL), with no constraint, with the grammar masks filled inline in the sampler, and
with them filled on a worker thread during the forward pass (the engine's default).

    python -m bench.diag.grammar_steps [--model DIR] [--streams 16] [--steps 24] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 8}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model's fp16 reference)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed per variant (after admission)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from athena_runtime.engine import EngineCore, find_eos_token_ids
    from athena_runtime.engine_settings import EngineSettings
    from athena_runtime.grammar import Grammars
    from athena_runtime.model_runner import ModelRunner
    from athena_runtime.sampling_params import SamplingParams

    if args.model is None:
        from quantize.embedded import reference_model_path
        args.model = str(reference_model_path())
    tok = AutoTokenizer.from_pretrained(args.model)
    eos = find_eos_token_ids(tok, args.model)
    cuda = args.device == "cuda"
    runner = ModelRunner.from_path(args.model, device=args.device, num_blocks=args.streams * 16 + 8, block_size=16,
                                   max_model_len=1024, use_cuda_graphs=cuda)
    if cuda:
        runner.capture_graphs(args.streams)
    grammar = Grammars(tok, eos).json_schema(SCHEMA)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}],
                                     add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)

    def run(label: str, constrained: bool, prefetch: bool) -> None:
        core = EngineCore(runner, tok, EngineSettings(device=args.device, max_num_seqs=args.streams,
                                                      num_blocks=runner.num_blocks), eos_token_ids=())
        if not prefetch:
            core.sampler.prepare = lambda rows: None
        for i in range(args.streams):   # ignore_eos, long budget: every stream decodes every timed step
            core.add_request(f"{label}{i}", prompt_ids, SamplingParams(
                temperature=0.7, seed=i, max_tokens=400, ignore_eos=True, constraint=grammar if constrained else None))
        core.step()                      # admission (prefill)
        times = []
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = core.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if len(outs) < args.streams:
                break
        print(f"  {label:28s} {len(times):3d} steps of {args.streams} streams: mean {1e3 * statistics.mean(times):7.2f} ms"
              f", median {1e3 * statistics.median(times):7.2f} ms")
        core.abort_all()

    print(f"{args.model} on {args.device}, {args.streams} streams, temperature 0.7")
    for _ in range(2):   # the first round warms caches up; both are printed
        run("no constraint", False, False)
        run("schema, masks inline", True, False)
        run("schema, masks on a worker", True, True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
