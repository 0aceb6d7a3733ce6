"""A model's own sampling defaults: the values its `generation_config.json` gives for the sampler's knobs, used for
the fields a request (or `athena chat`) leaves out, as vLLM does with `--generation-config auto`.

Only the sampler's knobs are taken (temperature, top_p, top_k, min_p, repetition_penalty); `do_sample`, beam
settings and lengths are not. A value of the wrong type or out of range is left out with a warning: a model folder's
metadata never stops it from loading.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

# key -> (type, check, range as the message states it)
_KNOBS: dict[str, tuple[type, object, str]] = {
    "temperature": (float, lambda v: 0.0 <= v <= 2.0, "in [0, 2]"),
    "top_p": (float, lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "top_k": (int, lambda v: v >= -1, ">= -1 (0 or -1: off)"),
    "min_p": (float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "repetition_penalty": (float, lambda v: 0.0 < v <= 10.0, "in (0, 10]"),
}
SAMPLING_KEYS: tuple[str, ...] = tuple(_KNOBS)


def check_knob(key: str, value: object) -> int | float:
    """`value` as the sampler takes it; ValueError naming the key when it is not a valid setting."""
    if key not in _KNOBS:
        raise ValueError(f"unknown sampling default {key!r}; known: {', '.join(SAMPLING_KEYS)}")
    kind, ok, allowed = _KNOBS[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (kind is int and float(value) != int(value)) or not math.isfinite(value):
        raise ValueError(f"sampling default {key}={value!r}: expected {'an integer' if kind is int else 'a number'}")
    value = kind(value)
    if not ok(value):
        raise ValueError(f"sampling default {key}={value!r}: must be {allowed}")
    return value


def read_generation_defaults(model_dir: str | Path) -> dict[str, int | float]:
    """The sampler knobs of `model_dir/generation_config.json` ({} without the file)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s); no sampling defaults from the model", path, exc)
        return {}
    if not isinstance(config, dict):
        log.warning("%s: not a JSON object; no sampling defaults from the model", path)
        return {}
    defaults = {}
    for key in SAMPLING_KEYS:
        if key in config and config[key] is not None:
            try:
                defaults[key] = check_knob(key, config[key])
            except ValueError as exc:
                log.warning("%s: %s; left out", path, exc)
    return defaults


def parse_overrides(text: str) -> dict[str, int | float]:
    """A JSON object of sampler knobs (a flag's value); ValueError saying what is wrong."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"sampling defaults must be a JSON object, e.g. '{{\"temperature\": 0.7}}' ({exc})") from None
    if not isinstance(given, dict):
        raise ValueError("sampling defaults must be a JSON object, e.g. '{\"temperature\": 0.7}'")
    return {key: check_knob(key, value) for key, value in given.items()}


def describe(defaults: dict[str, int | float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in defaults.items()) if defaults else "none"
