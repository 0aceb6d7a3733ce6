"""Load test of an OpenAI-compatible server: TTFT, TPOT, ITL, latency and throughput per load level.

    athena bench serve [--base-url http://127.0.0.1:8000] [--model NAME]
                       [--concurrency 1,8,32,64 | --request-rate 1,4,inf] [--num-prompts 64]
                       [--input-len 128 --output-len 128 | --dataset FILE] [--endpoint chat|completions]
                       [--api-key KEY] [--timeout-s 120] [--deadline-s 1800] [--seed 0]
                       [--extra-body JSON] [--json] [--plot FILE.png] [--allow-remote]
                       [--json-schema builtin|FILE [--compare-unconstrained]]

Every request streams (`stream: true`, `stream_options.include_usage`). One untimed `GET /v1/models`
comes first, also with `--model`: it warms the client up, so that the first timed request's TTFT is
the server's, not the client's own first-request set-up (30-70 ms on a 2-core CPU). A level is either a
concurrency cap (that many requests always in flight until `--num-prompts` are done) or a mean
arrival rate (Poisson arrivals, no cap; `inf` sends all at once). Only loopback servers are load
tested unless `--allow-remote` is given. `--json` prints one JSON object as the last stdout line
(the human report then goes to stderr). Exit status: 0 when some request completed, 1 when none
did, 2 for bad arguments or a refused target.

`--json-schema` puts `response_format: {"type": "json_schema", ...}` on every request (`builtin`: a
list of at least 1000 note objects with a bounded string, an integer range and an enum array, so
the grammar never completes before max_tokens and constrained requests are as long as free ones);
`--compare-unconstrained` runs each level twice, without then with the schema, and reports the
constrained output tok/s as a share of the free one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import ipaddress
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TextIO
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from athena_runtime.format.environment import Environment
from bench.serve_client import Target, list_models, stream_request, v1_base, warm_up
from bench.serve_metrics import LevelSummary, RequestRecord, summarize
from bench.serve_prompts import Prompt, dataset_prompts, random_prompts

MAX_NUM_PROMPTS = 10_000
BUILTIN_SCHEMA = {
    "type": "object",
    "properties": {
        "notes": {
            "type": "array",
            "minItems": 1000,
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string", "maxLength": 40},
                    "score": {"type": "integer", "minimum": 0, "maximum": 100},
                    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                },
                "required": ["title", "score", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["notes"],
    "additionalProperties": False,
}
MAX_CONCURRENCY = 4096


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _rate_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or inf, got {text!r}") from None


def _json_object(text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return obj


def _opt(help: str, type: Callable | None = None, metavar: str | None = None, **extra) -> dict:
    return {"help": help, "type": type, "metavar": metavar, **extra}


@dataclass(frozen=True)
class ServeBenchSettings:
    """One benchmark run. Each field is the command-line flag of the same name (`_` -> `-`)."""

    base_url: str = field(default="http://127.0.0.1:8000", metadata=_opt("server root or its /v1 URL", metavar="URL"))
    model: str | None = field(
        default=None, metadata=_opt("model id to send (default: the first id of GET /v1/models)", metavar="NAME")
    )
    concurrency: tuple[int, ...] = field(
        default=(1, 8, 32, 64),
        metadata=_opt(
            "comma-separated concurrency levels: requests kept in flight", _int_list, "N[,N...]", group="load"
        ),
    )
    request_rate: tuple[float, ...] | None = field(
        default=None,
        metadata=_opt(
            "instead of --concurrency: comma-separated mean arrival rates in req/s, Poisson arrivals, no "
            "concurrency cap (inf: all at once)",
            _rate_list,
            "R[,R...]",
            group="load",
        ),
    )
    num_prompts: int = field(default=64, metadata=_opt(f"requests per level (at most {MAX_NUM_PROMPTS})", int, "N"))
    input_len: int = field(default=128, metadata=_opt("approximate prompt tokens of the random-word prompts", int, "L"))
    output_len: int = field(
        default=128, metadata=_opt("max_tokens of every request (a dataset record's own max_tokens wins)", int, "L")
    )
    dataset: str | None = field(
        default=None,
        metadata=_opt(
            "prompts from FILE (.jsonl/.json records with prompt, text, conversations or messages; "
            "else one prompt per line) instead of random words",
            metavar="FILE",
        ),
    )
    endpoint: str = field(
        default="chat",
        metadata=_opt("chat: /v1/chat/completions; completions: /v1/completions", choices=("chat", "completions")),
    )
    api_key: str | None = field(
        default=None,
        metadata=_opt("send 'Authorization: Bearer KEY' (default: $ATHENA_API_KEY when set)", metavar="KEY"),
    )
    extra_body: dict = field(
        default_factory=dict,
        metadata=_opt(
            "JSON object merged into every request body, for non-OpenAI fields such as "
            "'{\"ignore_eos\": true}' (nothing non-standard is sent without it)",
            _json_object,
            "JSON",
        ),
    )
    timeout_s: float = field(
        default=120.0, metadata=_opt("per-request limit in seconds, connect to [DONE]", float, "T")
    )
    deadline_s: float = field(
        default=1800.0,
        metadata=_opt(
            "overall limit in seconds; unfinished requests are cancelled and later levels skipped", float, "T"
        ),
    )
    seed: int = field(default=0, metadata=_opt("seed of the prompts and of the arrival times", int, "S"))
    json: bool = field(
        default=False, metadata=_opt("print the results as one JSON object, last on stdout", action="store_true")
    )
    plot: str | None = field(
        default=None,
        metadata=_opt("write a PNG of latency and throughput per level (needs matplotlib)", metavar="FILE.png"),
    )
    allow_remote: bool = field(
        default=False,
        metadata=_opt(
            "allow a base URL that is not loopback (127.0.0.0/8, ::1, localhost); only load-test servers you run",
            action="store_true",
        ),
    )
    json_schema: str | None = field(
        default=None,
        metadata=_opt(
            "put this JSON schema (builtin, or a FILE holding one) as response_format on every request",
            metavar="builtin|FILE",
        ),
    )
    compare_unconstrained: bool = field(
        default=False,
        metadata=_opt(
            "with --json-schema: run every level without the schema first, then with it", action="store_true"
        ),
    )
    progress: bool = field(
        default=True,
        metadata=_opt("tqdm progress bar on stderr (--no-progress to hide)", action=argparse.BooleanOptionalAction),
    )

    def __post_init__(self) -> None:
        if not 1 <= self.num_prompts <= MAX_NUM_PROMPTS:
            raise ValueError(f"--num-prompts must be in 1..{MAX_NUM_PROMPTS}")
        if self.request_rate is None:
            if not self.concurrency or any(not 1 <= c <= MAX_CONCURRENCY for c in self.concurrency):
                raise ValueError(f"--concurrency levels must be in 1..{MAX_CONCURRENCY}")
        elif not self.request_rate or any(not r > 0 for r in self.request_rate):  # also rejects nan
            raise ValueError("--request-rate values must be > 0 (inf allowed)")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("--input-len and --output-len must be >= 1")
        if not self.timeout_s > 0 or not self.deadline_s > 0:
            raise ValueError("--timeout-s and --deadline-s must be > 0")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError("--endpoint must be chat or completions")
        if self.compare_unconstrained and self.json_schema is None:
            raise ValueError("--compare-unconstrained needs --json-schema")

    def response_format(self) -> dict | None:
        """The response_format that --json-schema asks for (None without it)."""
        if self.json_schema is None:
            return None
        if self.json_schema == "builtin":
            schema = BUILTIN_SCHEMA
        else:
            with open(self.json_schema, encoding="utf-8") as f:
                schema = json.load(f)
        return {"type": "json_schema", "json_schema": {"name": "bench", "strict": True, "schema": schema}}

    @property
    def mode(self) -> str:
        return "concurrency" if self.request_rate is None else "request_rate"

    def public_dict(self) -> dict:
        """The settings for the JSON report, with the API key hidden."""
        d = dataclasses.asdict(self)
        d["api_key"] = "***" if self.api_key else None
        if self.request_rate is not None:
            d["request_rate"] = [("inf" if math.isinf(r) else r) for r in self.request_rate]
            d["concurrency"] = None  # not used in request-rate mode
        return d


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(prog="athena bench serve", description=doc.splitlines()[0])
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(ServeBenchSettings):
        meta = {k: v for k, v in f.metadata.items() if v is not None}
        group = meta.pop("group", None)
        if group is not None and group not in groups:
            groups[group] = ap.add_mutually_exclusive_group()
        where = ap if group is None else groups[group]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if default not in (None, False, True, {}) and "default" not in meta["help"]:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            meta["help"] += f" (default: {shown})"
        where.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, **meta)
    return ap


def parse_settings(argv: list[str] | None) -> ServeBenchSettings:
    ap = build_parser()
    ns = ap.parse_args(argv)
    if ns.api_key is None:
        ns.api_key = Environment.read().api_key
    try:
        return ServeBenchSettings(**vars(ns))
    except ValueError as exc:
        ap.error(str(exc))
        raise  # unreachable: ap.error exits


def is_loopback_url(url: str) -> bool:
    """True for http(s) URLs whose host is localhost, 127.0.0.0/8 or ::1 (also IPv4-mapped)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_target(url: str, allow_remote: bool) -> str | None:
    """An error message when the URL must not be load-tested, else None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"--base-url must be an http(s) URL with a host, got {url!r}"
    if not allow_remote and not is_loopback_url(url):
        return (
            f"refusing to load-test {parts.hostname!r}: not a loopback address (127.0.0.0/8, ::1, localhost). "
            "Pass --allow-remote only for a server you run."
        )
    return None


def level_prompts(settings: ServeBenchSettings, index: int) -> list[Prompt]:
    """The prompts of level `index`: fresh random prompts per level (no prefix-cache reuse across
    levels), or the dataset in a per-level seeded order."""
    seed = settings.seed * 1000 + index
    if settings.dataset:
        return dataset_prompts(settings.dataset, settings.num_prompts, settings.output_len, seed)
    return random_prompts(settings.num_prompts, settings.input_len, settings.output_len, seed)


async def _send(client: httpx.AsyncClient, target: Target, p: Prompt, records: list[RequestRecord], bar) -> None:
    records.append(await stream_request(client, target, p.text, p.max_tokens, prompt_tokens_estimate=p.tokens_estimate))
    bar.update(1)


async def run_level(
    client: httpx.AsyncClient,
    target: Target,
    prompts: list[Prompt],
    *,
    concurrency: int | None = None,
    request_rate: float | None = None,
    seed: int = 0,
    time_left_s: float = math.inf,
    bar=None,
) -> tuple[list[RequestRecord], float, bool]:
    """Run one level; returns (records, wall seconds, whether the time ran out). Exactly one of
    `concurrency` and `request_rate` is given."""
    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency and request_rate")
    bar = bar if bar is not None else tqdm(disable=True)
    records: list[RequestRecord] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    if concurrency is not None:
        queue = iter(prompts)  # shared by the workers; one event loop, so no lock needed

        async def worker() -> None:
            for p in queue:
                await _send(client, target, p, records, bar)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(prompts)))]
    else:
        rng = random.Random(seed)
        offsets, t = [], 0.0
        for _ in prompts:
            offsets.append(t)
            t += 0.0 if math.isinf(request_rate) else rng.expovariate(request_rate)

        async def arrive(p: Prompt, offset: float) -> None:
            await asyncio.sleep(max(0.0, start + offset - loop.time()))
            await _send(client, target, p, records, bar)

        tasks = [asyncio.ensure_future(arrive(p, o)) for p, o in zip(prompts, offsets)]
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), None if math.isinf(time_left_s) else time_left_s)
    except asyncio.TimeoutError:
        timed_out = True
    finally:
        for t_ in tasks:
            t_.cancel()
    return records, loop.time() - start, timed_out


async def run_bench(settings: ServeBenchSettings, err: TextIO) -> tuple[dict, list[LevelSummary]]:
    """All levels against the server: the JSON-ready result and the level summaries."""
    t_start = time.monotonic()
    base = v1_base(settings.base_url)
    levels = settings.concurrency if settings.request_rate is None else settings.request_rate
    result: dict = {
        "bench": "serve",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_url": base,
        "mode": settings.mode,
        "settings": settings.public_dict(),
        "model": settings.model,
        "deadline_reached": False,
        "skipped_levels": [],
        "levels": [],
    }
    # No pool cap (a queue in the client would count as server latency); keep-alive up to the most
    # requests that can be in flight.
    in_flight = settings.num_prompts if settings.request_rate else min(settings.num_prompts, max(settings.concurrency))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=in_flight)
    timeout = httpx.Timeout(settings.timeout_s)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        model = settings.model
        if model is not None:  # (without --model, listing the models warms the client up)
            failed = await warm_up(client, base, settings.api_key)
            if failed is not None:
                print(f"warm-up request to {base}/models failed ({failed}); timing anyway", file=err)
        else:
            try:
                ids = await list_models(client, base, settings.api_key)
            except (httpx.HTTPError, ValueError) as exc:
                raise RuntimeError(f"cannot list models at {base}/models ({exc}); pass --model") from None
            if not ids:
                raise RuntimeError(f"{base}/models lists no model; pass --model")
            model = ids[0]
        result["model"] = model
        fmt = settings.response_format()
        variants = [None, fmt] if settings.compare_unconstrained else [fmt]
        summaries: list[LevelSummary] = []
        constrained: list[bool] = []
        for i, value in enumerate(levels):
            for variant in variants:
                left = settings.deadline_s - (time.monotonic() - t_start)
                if left <= 0:
                    result["deadline_reached"] = True
                    result["skipped_levels"].append("inf" if math.isinf(value) else value)
                    continue
                extra = dict(settings.extra_body) | ({"response_format": variant} if variant else {})
                target = Target(
                    base_url=base,
                    model=model,
                    endpoint=settings.endpoint,
                    api_key=settings.api_key,
                    timeout_s=settings.timeout_s,
                    extra_body=extra,
                )
                prompts = level_prompts(settings, i)
                kw = {"concurrency": int(value)} if settings.mode == "concurrency" else {"request_rate": float(value)}
                label = f"{settings.mode.replace('_', ' ')} {value:g}" + (" json-schema" if variant else "")
                with tqdm(
                    total=len(prompts),
                    desc=label,
                    unit="req",
                    file=err,
                    leave=False,
                    disable=None if settings.progress else True,
                ) as bar:
                    records, wall, timed_out = await run_level(
                        client, target, prompts, seed=settings.seed + i, time_left_s=left, bar=bar, **kw
                    )
                result["deadline_reached"] |= timed_out
                summaries.append(summarize(records, wall, unfinished=len(prompts) - len(records), **kw))
                constrained.append(variant is not None)
                out = err if settings.json else sys.stdout
                if fmt is not None:
                    print(f"-- {'with the JSON schema' if variant else 'without constraints'}", file=out)
                print_level(summaries[-1], out)
    result["levels"] = [
        s.to_dict() | ({"json_schema": c} if fmt is not None else {}) for s, c in zip(summaries, constrained)
    ]
    if settings.compare_unconstrained:
        result["constrained_share"] = compare_constrained(summaries, constrained, err if settings.json else sys.stdout)
    result["duration_s"] = time.monotonic() - t_start
    return result, summaries


def compare_constrained(summaries: list[LevelSummary], constrained: list[bool], out: TextIO) -> list[dict]:
    """Per level: output tok/s with the schema as a share of the same level without it."""
    rows = []
    for k in range(0, len(summaries) - 1, 2):
        free, fixed = summaries[k], summaries[k + 1]
        if constrained[k] or not constrained[k + 1]:
            continue
        share = fixed.output_tokens_per_s / free.output_tokens_per_s if free.output_tokens_per_s else None
        level = free.concurrency if free.request_rate is None else free.request_rate
        rows.append(
            {
                "level": level,
                "free_output_tokens_per_s": free.output_tokens_per_s,
                "schema_output_tokens_per_s": fixed.output_tokens_per_s,
                "share": share,
            }
        )
        shown = "-" if share is None else f"{100 * share:.1f}%"
        print(
            f"== level {level:g}: output tok/s with the JSON schema {fixed.output_tokens_per_s:.1f} = {shown} "
            f"of {free.output_tokens_per_s:.1f} without",
            file=out,
        )
    return rows


def _fmt(v: float | None, width: int = 9) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.1f}"


def print_level(s: LevelSummary, out: TextIO) -> None:
    what = (
        f"concurrency {s.concurrency}"
        if s.request_rate is None
        else ("request rate inf (all at once)" if math.isinf(s.request_rate) else f"request rate {s.request_rate:g}/s")
    )
    extra = f", {s.unfinished} unfinished (deadline)" if s.unfinished else ""
    print(f"== {what}: {s.completed} ok, {s.failed} failed{extra} in {s.duration_s:.2f} s", file=out)
    print(
        f"   requests/s {s.requests_per_s:.2f}   output tok/s {s.output_tokens_per_s:.1f}   "
        f"input tok/s {s.input_tokens_per_s:.1f}   (token counts from {s.token_counts_from})",
        file=out,
    )
    print(f"   {'ms':<6}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}", file=out)
    for name, st in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)):
        print(f"   {name:<6}{_fmt(st.mean)}{_fmt(st.p50)}{_fmt(st.p90)}{_fmt(st.p99)}", file=out)
    if s.errors:
        kinds = ", ".join(f"{k}={n}" for k, n in s.errors.items())
        print(f"   errors: {kinds}", file=out)
        for k, detail in s.error_examples.items():
            print(f"     {k}: {detail[:120]}", file=out)
    out.flush()


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    err = sys.stderr
    problem = check_target(settings.base_url, settings.allow_remote)
    if problem:
        print(f"athena bench serve: error: {problem}", file=err)
        return 2
    if settings.allow_remote and not is_loopback_url(settings.base_url):
        print(f"athena bench serve: warning: load-testing a non-loopback server ({settings.base_url})", file=err)
    if settings.plot and importlib.util.find_spec("matplotlib") is None:
        print("athena bench serve: error: --plot needs matplotlib (pip install 'athena[bench]')", file=err)
        return 2
    if settings.dataset and not os.path.isfile(settings.dataset):
        print(f"athena bench serve: error: no dataset file {settings.dataset}", file=err)
        return 2
    try:
        settings.response_format()
    except (OSError, ValueError) as exc:
        print(f"athena bench serve: error: --json-schema {settings.json_schema}: {exc}", file=err)
        return 2
    try:
        result, summaries = asyncio.run(run_bench(settings, err))
    except (RuntimeError, ValueError) as exc:
        print(f"athena bench serve: error: {exc}", file=err)
        return 2
    result["plot"] = None
    if settings.plot and summaries:
        from bench.serve_plot import plot_levels

        title = f"{result['model']} @ {result['base_url']} ({settings.endpoint}, {settings.num_prompts} req/level)"
        result["plot"] = str(plot_levels(summaries, settings.plot, title))
        print(f"plot written to {result['plot']}", file=err if settings.json else sys.stdout)
    completed = sum(s.completed for s in summaries)
    if result["deadline_reached"]:
        print(f"athena bench serve: the overall deadline ({settings.deadline_s:g} s) was reached", file=err)
    if completed == 0:
        print("athena bench serve: no request completed", file=err)
    if settings.json:
        sys.stdout.flush()
        print(json.dumps(result, allow_nan=False))
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(main())
