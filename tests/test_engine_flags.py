"""`athena serve` flags and ATHENA_* variables of the engine's scheduling and caching settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.cli import build_parser
from server.serve_cli import settings_from_args


def parse(*argv: str):
    return settings_from_args(build_parser("serve").parse_args(["serve", *argv]))


def test_prefill_chunk_tokens_flag_and_env(monkeypatch):
    monkeypatch.delenv("ATHENA_PREFILL_CHUNK_TOKENS", raising=False)
    assert parse().engine_settings().prefill_chunk_tokens is None  # the device's default
    assert parse("--prefill-chunk-tokens", "32").engine_settings().prefill_chunk_tokens == 32
    monkeypatch.setenv("ATHENA_PREFILL_CHUNK_TOKENS", "48")
    assert parse().engine_settings().prefill_chunk_tokens == 48
    assert parse("--prefill-chunk-tokens", "1").engine_settings().prefill_chunk_tokens == 1
    with pytest.raises(ValidationError):
        parse("--prefill-chunk-tokens", "0")
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        parse("--prefill-chunk-tokens", "2049").engine_settings()


def test_prefix_cache_flag_and_env(monkeypatch):
    monkeypatch.delenv("ATHENA_PREFIX_CACHE", raising=False)
    assert parse().prefix_cache is None and parse().engine_settings().prefix_cache is True  # on by default
    assert parse("--no-prefix-cache").engine_settings().prefix_cache is False
    monkeypatch.setenv("ATHENA_PREFIX_CACHE", "false")
    assert parse().engine_settings().prefix_cache is False
    assert parse("--prefix-cache").engine_settings().prefix_cache is True  # the flag wins
