"""`athena chat`: talk to a model in the terminal, streaming tokens through the engine.

One turn with --prompt; otherwise a REPL that keeps the conversation (commands: /reset, /exit).
The prompt is the model's chat template (tokenizer.apply_chat_template) applied to the history;
the oldest turns are dropped when the history no longer fits the context.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any, TextIO

from athena_runtime.chat_prompt import render_chat
from athena_runtime.engine_settings import KV_FORMATS, EngineSettings
from athena_runtime.sampling_params import SamplingParams

CHAT_TEMPERATURE = 0.7  # when neither --temperature nor the model's generation config gives one


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a compressed model in the terminal",
        description="Stream a chat with a compressed checkpoint: one answer with --prompt, "
        "else an interactive session (/reset clears the history, /exit or Ctrl-D quits).",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="compressed checkpoint folder (default: the embedded SmolLM2-135M-Instruct, "
        "quantized and cached on first use)",
    )
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per answer at most")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"0 = greedy (default: the model's generation_config.json, else {CHAT_TEMPERATURE})",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible answers)")
    p.add_argument("--kv-cache", choices=KV_FORMATS, default="fp16", help="KV cache format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from athena_runtime.engine import AsyncEngine

    if args.model is None:
        from quantize.embedded import default_model_path

        args.model = default_model_path()
    engine = AsyncEngine.from_path(
        args.model, EngineSettings(kv_cache=args.kv_cache, max_num_seqs=1, max_num_batched_tokens=2048)
    )
    params = chat_params(args, engine.generation_defaults)
    return asyncio.run(chat(engine, params, system=args.system, prompt=args.prompt))


def chat_params(args: argparse.Namespace, model_defaults: dict[str, int | float]) -> SamplingParams:
    """The flags, then the model's sampling defaults (generation_config.json), then CHAT_TEMPERATURE."""
    knobs = dict(model_defaults)
    if args.temperature is not None:
        knobs["temperature"] = args.temperature
    knobs.setdefault("temperature", CHAT_TEMPERATURE)
    knobs["top_k"] = max(0, int(knobs.get("top_k", 0)))
    return SamplingParams(**knobs, seed=args.seed, max_tokens=args.max_tokens)


def prompt_token_ids(tokenizer: Any, messages: list[dict[str, str]], max_prompt_tokens: int) -> list[int]:
    """Chat-template the messages, dropping the oldest turns (never the system message) to fit."""
    messages = list(messages)
    while True:
        text = render_chat(tokenizer, messages)  # no template (a base model): plain text
        ids = tokenizer.encode(text, add_special_tokens=False)
        first_turn = 1 if messages[0]["role"] == "system" else 0
        if len(ids) <= max_prompt_tokens or len(messages) - first_turn <= 1:
            return ids
        del messages[first_turn : first_turn + 2]  # oldest user + assistant pair


async def chat(
    engine: Any,
    params: SamplingParams,
    system: str | None = None,
    prompt: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> int:
    """Run one turn (`prompt`) or a REPL reading lines with `read`; returns an exit code."""
    await engine.start()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    max_prompt = max(1, engine.max_model_len - params.max_tokens)
    code, turn = 0, 0
    try:
        while True:
            if prompt is not None:
                line = prompt
            else:
                try:
                    line = read("> ").strip()
                except EOFError:
                    out.write("\n")
                    break
                if line in ("/exit", "/quit"):
                    break
                if line == "/reset":
                    del history[1 if system else 0 :]
                    continue
                if not line:
                    continue
            history.append({"role": "user", "content": line})
            ids = prompt_token_ids(engine.tokenizer, history, max_prompt)
            answer = []
            try:
                async for piece in engine.generate(f"chat-{turn}", ids, params):
                    out.write(piece.text)
                    out.flush()
                    answer.append(piece.text)
                    if piece.finish_reason == "error":
                        print(f"\n[error: {piece.error}]", file=sys.stderr)
                        code = 1
            except ValueError as exc:  # e.g. one message longer than the context
                print(f"[{exc}]", file=sys.stderr)
                history.pop()
                code = 2
                if prompt is not None:
                    break
                continue
            out.write("\n")
            history.append({"role": "assistant", "content": "".join(answer)})
            turn += 1
            if prompt is not None:
                break
    finally:
        await engine.shutdown(drain_timeout_s=0.0)
    return code
