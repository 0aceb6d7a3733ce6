"""Server settings: one pydantic-settings class, read from `ATHENA_*` environment variables and
overridden field by field by `athena serve` flags (serve_cli.py builds one flag per field).

The engine's fields are not declared here: `ServerSettings` is built from `EngineSettings`' fields (their types, help
texts and lower bounds, athena_runtime/engine_settings.py), each optional; one left at None takes the engine's default.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import Field, SecretStr, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from athena_runtime.engine_settings import EngineSettings
from athena_runtime.format.generation_defaults import parse_overrides

# ServerSettings fields forwarded to EngineSettings under the same name: all of EngineSettings'.
ENGINE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EngineSettings))


def _engine_fields() -> dict[str, Any]:
    """pydantic fields for EngineSettings' fields: the same type or None (None: the engine's default)."""
    hints = typing.get_type_hints(EngineSettings)
    fields = {}
    for f in dataclasses.fields(EngineSettings):
        bound = {} if f.metadata.get("ge") is None else {"ge": f.metadata["ge"]}
        fields[f.name] = (hints[f.name] | None, Field(None, description=f.metadata["help"], **bound))
    return fields


class _ServerOwnSettings(BaseSettings):
    """The server's own fields; `ServerSettings` adds the engine's."""

    model_config = SettingsConfigDict(env_prefix="ATHENA_", extra="ignore", frozen=True)

    # What to serve and where.
    model: str | None = Field(
        None, description="compressed checkpoint folder (default: the embedded model, quantized on first use)"
    )
    served_model_name: str | None = Field(
        None, description="model id clients send and /v1/models lists (default: the checkpoint's name)"
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind")
    api_key: SecretStr | None = Field(
        None, description="require 'Authorization: Bearer KEY' on /v1 routes (prefer ATHENA_API_KEY: flags show in ps)"
    )

    # Sampling defaults (for the fields a request leaves out).
    generation_config: Literal["auto", "none"] = Field(
        "auto",
        description="sampling defaults for fields a request leaves out: 'auto' takes the model's "
        "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty), 'none' the "
        "OpenAI API's (temperature 1, top_p 1)",
    )
    override_generation_config: str | None = Field(
        None, description='JSON object of sampling defaults over those, e.g. \'{"temperature": 0.7, "top_p": 0.9}\''
    )

    # Limits per request.
    max_choices: int | None = Field(
        None,
        ge=1,
        description="choices (prompts x n) one request may ask for; 400 above (default and upper bound: "
        "--max-queue, as a request's choices are queued all together or not at all)",
    )

    # HTTP behaviour.
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="largest accepted request body (413 above)")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection must send a request's headers within this many seconds (of connecting, "
        "or of its next request's first byte), else it is closed",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="a request's body must arrive within this many seconds of its headers (408 after)"
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="an idle kept-alive connection is closed after this many seconds"
    )
    max_connections: int = Field(
        1000, ge=1, description="open connections (or requests) beyond which new requests get a plain 503 from uvicorn"
    )
    drain_timeout_s: float = Field(
        10.0,
        ge=0,
        description="on SIGTERM/SIGINT, how long running requests may finish (new ones get 503); then the "
        "rest end (streams: an error event and [DONE])",
    )
    retry_after_s: int = Field(
        1, ge=0, description="Retry-After seconds sent with 503 (loading, draining), and the fewest sent with 429"
    )
    retry_after_max_s: int = Field(
        60,
        ge=0,
        description="the most Retry-After seconds sent with 429 (queue full: "
        "waiting requests / requests finished per second lately)",
    )
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

    def engine_settings(self) -> EngineSettings:
        given = {name: getattr(self, name) for name in ENGINE_FIELDS if getattr(self, name) is not None}
        return EngineSettings(**given)


ServerSettings = create_model("ServerSettings", __base__=_ServerOwnSettings, __module__=__name__, **_engine_fields())
ServerSettings.__doc__ = "Everything `athena serve` takes: the server's own settings and the engine's (all optional)."
