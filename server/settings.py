"""Server settings: one pydantic-settings class, read from `ATHENA_*` environment variables and
overridden field by field by `athena serve` flags (serve_cli.py builds one flag per field).

Engine fields left at None take the engine's own default (athena_runtime/engine_settings.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from athena_runtime.format.generation_defaults import parse_overrides

if TYPE_CHECKING:
    from athena_runtime.engine_settings import EngineSettings

# ServerSettings fields forwarded to EngineSettings under the same name.
ENGINE_FIELDS: tuple[str, ...] = (
    "kv_cache", "kv_hadamard", "block_size", "max_num_seqs", "max_model_len",
    "max_num_batched_tokens", "prefill_chunk_tokens", "kv_budget_bytes", "num_blocks", "max_queue", "device",
    "use_cuda_graphs", "prefix_cache",
)


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATHENA_", extra="ignore", frozen=True)

    # What to serve and where.
    model: str | None = Field(
        None, description="compressed checkpoint folder (default: the embedded model, quantized on first use)")
    served_model_name: str | None = Field(
        None, description="model id clients send and /v1/models lists (default: the checkpoint's name)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind")
    api_key: SecretStr | None = Field(
        None, description="require 'Authorization: Bearer KEY' on /v1 routes (prefer ATHENA_API_KEY: flags show in ps)")

    # Engine (None: the engine's default).
    kv_cache: Literal["fp16", "int8", "int4"] | None = Field(None, description="KV cache format")
    kv_hadamard: bool | None = Field(None, description="Hadamard-rotate K and V before quantizing (int4 always does)")
    block_size: int | None = Field(None, ge=1, description="tokens per KV block")
    max_num_seqs: int | None = Field(None, ge=1, description="requests decoded together in one batch")
    max_model_len: int | None = Field(None, ge=1, description="prompt + completion token limit (default: the model's)")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="tokens fed to the model per step")
    prefill_chunk_tokens: int | None = Field(
        None, ge=1, description="prompt tokens per step while requests decode: a long prompt delays their streams by "
                                "one such chunk a step (default: 128 on CPU, 512 on CUDA)")
    kv_budget_bytes: int | None = Field(None, ge=1, description="bytes for the KV cache")
    num_blocks: int | None = Field(None, ge=1, description="KV blocks (overrides --kv-budget-bytes)")
    max_queue: int | None = Field(None, ge=0, description="waiting requests before new ones get 429")
    device: str | None = Field(None, description="torch device (default: cuda if available, else cpu)")
    use_cuda_graphs: bool | None = Field(None, description="replay decode steps as CUDA graphs")
    prefix_cache: bool | None = Field(
        None, description="reuse the KV cache blocks of prompt prefixes computed before (shared system prompts, "
                          "earlier turns of a chat); --no-prefix-cache turns it off")

    # Sampling defaults (for the fields a request leaves out).
    generation_config: Literal["auto", "none"] = Field(
        "auto", description="sampling defaults for fields a request leaves out: 'auto' takes the model's "
                            "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty), 'none' the "
                            "OpenAI API's (temperature 1, top_p 1)")
    override_generation_config: str | None = Field(
        None, description="JSON object of sampling defaults over those, e.g. '{\"temperature\": 0.7, \"top_p\": 0.9}'")

    # Limits per request.
    max_choices: int | None = Field(
        None, ge=1, description="choices (prompts x n) one request may ask for; 400 above (default and upper bound: "
                                "--max-queue, as a request's choices are queued all together or not at all)")

    # HTTP behaviour.
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="largest accepted request body (413 above)")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must send a request's headers within this many seconds (of connecting, "
                                "or of its next request's first byte), else it is closed")
    body_timeout_s: float = Field(60.0, gt=0, description="a request's body must arrive within this many seconds "
                                                           "of its headers (408 after)")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle kept-alive connection is closed after this "
                                                                "many seconds")
    max_connections: int = Field(1000, ge=1, description="open connections (or requests) beyond which new requests "
                                                          "get a plain 503 from uvicorn")
    drain_timeout_s: float = Field(
        10.0, ge=0, description="on SIGTERM/SIGINT, how long running requests may finish (new ones get 503); then the "
                                "rest end (streams: an error event and [DONE])")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503 (loading, draining), and the "
                                                     "fewest sent with 429")
    retry_after_max_s: int = Field(60, ge=0, description="the most Retry-After seconds sent with 429 (queue full: "
                                                          "waiting requests / requests finished per second lately)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="server log level")

    @field_validator("override_generation_config")
    @classmethod
    def _valid_overrides(cls, v: str | None) -> str | None:
        if v is not None:
            parse_overrides(v)  # ValueError: pydantic reports it against the field
        return v

    def sampling_defaults(self, model_defaults: dict[str, int | float]) -> dict[str, int | float]:
        """The defaults in effect: the model's (with 'auto'), then the overrides."""
        given = dict(model_defaults) if self.generation_config == "auto" else {}
        if self.override_generation_config is not None:
            given.update(parse_overrides(self.override_generation_config))
        return given

    def engine_settings(self) -> "EngineSettings":
        from athena_runtime.engine_settings import EngineSettings

        given = {name: getattr(self, name) for name in ENGINE_FIELDS if getattr(self, name) is not None}
        return EngineSettings(**given)
