"""The serving benchmark's workload: random-word prompts of about N tokens, or prompts from a file.

No tokenizer is consulted. A random prompt is `input_len` common English words, each usually one
token for Llama-, Mistral-, Qwen- and GPT-style tokenizers (the chat template adds a few more); a
file prompt's estimate is one token per 4 characters. Estimates are used only when the server sends
no `usage`.

Dataset files:
- `.jsonl`: one JSON object per line; `.json`: a list of such objects. The prompt is the object's
  `prompt` or `text` field, or the first human/user turn of `conversations` (ShareGPT) or
  `messages`; an optional `max_tokens` / `output_len` integer overrides `--output-len`.
- anything else: plain text, one prompt per non-empty line.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they "
    "which one you were all we her she there would their will when who him been has more if no out "
    "so said what up its about than into them can only other time new some could these two may first "
    "then do any like my now over such our man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go "
    "came right used take three house water light river city music garden window paper story"
).split()


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int
    tokens_estimate: int


def random_prompts(n: int, input_len: int, output_len: int, seed: int) -> list[Prompt]:
    """`n` distinct prompts of `input_len` random common words (about that many tokens)."""
    rng = random.Random(seed)
    return [Prompt(" ".join(rng.choice(WORDS) for _ in range(input_len)), output_len, input_len) for _ in range(n)]


def _text_of(obj: dict) -> str | None:
    for key in ("prompt", "text"):
        if isinstance(obj.get(key), str):
            return obj[key]
    for key, role_key, text_key, roles in (
        ("conversations", "from", "value", ("human", "user")),
        ("messages", "role", "content", ("user",)),
    ):
        turns = obj.get(key)
        if isinstance(turns, list):
            for turn in turns:
                if isinstance(turn, dict) and turn.get(role_key) in roles and isinstance(turn.get(text_key), str):
                    return turn[text_key]
    return None


def _records(path: Path) -> list[tuple[str, int | None]]:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        objs = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix == ".json":
        objs = json.loads(raw)
        if not isinstance(objs, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
    else:
        return [(line.strip(), None) for line in raw.splitlines() if line.strip()]
    out = []
    for obj in objs:
        if not isinstance(obj, dict):
            continue
        text = _text_of(obj)
        if text and text.strip():
            n = obj.get("max_tokens", obj.get("output_len"))
            out.append((text, n if isinstance(n, int) and n > 0 else None))
    return out


def dataset_prompts(path: str | Path, n: int, output_len: int, seed: int) -> list[Prompt]:
    """`n` prompts drawn from a file in a seeded order (repeating the file when it is shorter)."""
    path = Path(path)
    records = _records(path)
    if not records:
        raise ValueError(f"{path}: no prompts found")
    rng = random.Random(seed)
    rng.shuffle(records)
    picked = [records[i % len(records)] for i in range(n)]
    return [Prompt(text, max_tokens or output_len, max(1, math.ceil(len(text) / 4))) for text, max_tokens in picked]
