"""Time to first token of a lone prompt, the way bench.serve_gap (and bench.serve_overhead) measure it: the engine
alone (`engine_ttft_ms`: add a random-id prompt with max_tokens 1 to an idle EngineCore, step until done) and behind
the server (`server_ttft_ms`: the same prompt as token ids, streamed, until the first data event), the latter from a
child process (`server_ttft_in_child`, which runs this module) so that the client does not share the server's GIL.

    python -m bench.ttft_client URL --model NAME --ttft-prompt N --vocab V --repeats R   # prints a JSON list of ms
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def engine_ttft_ms(core, prompt_len: int, vocab: int, repeats: int) -> list[float]:
    from athena_runtime.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(170)
    times = []
    for r in range(repeats):
        core.add_request(
            f"ttft{r}",
            torch.randint(3, vocab, (prompt_len,), generator=g).tolist(),
            SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
        )
        t0 = time.perf_counter()
        while core.has_work():
            core.step()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def server_ttft_ms(url: str, model: str, prompt_len: int, vocab: int, repeats: int) -> list[float]:
    import httpx

    g = torch.Generator().manual_seed(171)
    times = []
    with httpx.Client(timeout=60) as http:
        for _ in range(repeats):
            body = {
                "model": model,
                "prompt": torch.randint(3, vocab, (prompt_len,), generator=g).tolist(),
                "max_tokens": 1,
                "temperature": 0,
                "stream": True,
            }
            t0 = time.perf_counter()
            first = None
            with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():  # read to [DONE]: the next request starts on an idle server
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter()
            times.append(1e3 * (first - t0))
    return times


def server_ttft_in_child(url: str, model: str, prompt_len: int, vocab: int, repeats: int) -> list[float]:
    """`server_ttft_ms` in a child process: a client in the server's interpreter would take its GIL."""
    cmd = [
        sys.executable,
        "-m",
        "bench.ttft_client",
        url,
        "--model",
        model,
        "--ttft-prompt",
        str(prompt_len),
        "--vocab",
        str(vocab),
        "--repeats",
        str(repeats),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the TTFT client exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--model", required=True)
    ap.add_argument("--ttft-prompt", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(json.dumps(server_ttft_ms(args.url, args.model, args.ttft_prompt, args.vocab, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
