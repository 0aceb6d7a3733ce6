"""Structured outputs: `response_format` (json_object / json_schema) -> a grammar the engine enforces
token by token (athena_runtime/grammar.py, xgrammar), with the schema checked first.

What a schema may use (each is enforced by the grammar, so every finished output validates):
`type` (one or a list), `properties`, `required`, `additionalProperties`, `items`, `prefixItems`,
`minItems` / `maxItems`, `enum`, `const`, `anyOf`, `allOf` with one subschema (pydantic's `$ref`
wrapper), local `$ref` into `$defs` / `definitions` (recursion included), `minLength` / `maxLength`,
`pattern`, `format`, `minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum`, `multipleOf`,
`minProperties` / `maxProperties`, `propertyNames`, `unevaluatedProperties` / `unevaluatedItems`;
annotations (`title`, `description`, `default`, `examples`, ...) are ignored.
What a 400 names (xgrammar would ignore it, so outputs could break it): `not`, `if` / `then` / `else`,
`oneOf` (use `anyOf`: "exactly one" cannot be enforced), `uniqueItems`, `contains` / `minContains` /
`maxContains`, `dependentRequired` / `dependentSchemas` / `dependencies`, `patternProperties`,
OpenAPI's `nullable` / `discriminator` (use `"type": [..., "null"]`), `allOf` with several subschemas,
`$ref` outside the schema, `$dynamicRef` / `$recursiveRef`; and combinations whose other half xgrammar
drops: validation keywords beside `$ref`, `anyOf`, `allOf`, `enum` or `const` (annotations are fine, so
is a matching `type` beside `enum` / `const`), `minLength` / `maxLength` beside `pattern` or `format`.

Output form: one line, `", "` and `": "` separators, properties in the schema's order, and (as
OpenAI's strict mode) no properties beyond those the schema names. The `strict` flag is accepted
either way: the schema is always enforced. The grammar vocabulary for the tokenizer is built on the
first structured request (about a second for a 50k vocabulary); compiled schemas are cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from server import errors
from server.protocol_structured import ResponseFormat

if TYPE_CHECKING:
    from athena_runtime.grammar import Grammar, Grammars

log = logging.getLogger("athena.server")

UNSUPPORTED = {
    "not": "not",
    "if": "if/then/else",
    "then": "if/then/else",
    "else": "if/then/else",
    "oneOf": "oneOf (use anyOf)",
    "uniqueItems": "uniqueItems",
    "contains": "contains",
    "minContains": "minContains",
    "maxContains": "maxContains",
    "dependentRequired": "dependentRequired",
    "dependentSchemas": "dependentSchemas",
    "dependencies": "dependencies",
    "patternProperties": "patternProperties",
    "nullable": 'nullable (OpenAPI; use "type": [..., "null"])',
    "discriminator": "discriminator (OpenAPI)",
    "$dynamicRef": "$dynamicRef",
    "$recursiveRef": "$recursiveRef",
    "$dynamicAnchor": "$dynamicAnchor",
    "$recursiveAnchor": "$recursiveAnchor",
}
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # name -> subschema
_SCHEMA_LISTS = ("prefixItems", "anyOf", "allOf")  # [subschema, ...]
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems")
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$schema",
        "$id",
        "$anchor",
        "contentMediaType",
        "contentEncoding",
        "$defs",
        "definitions",
    }
)
_ALONE = ("$ref", "anyOf", "allOf", "enum", "const")  # xgrammar ignores validation keywords beside these
_JSON_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "object": (dict,),
    "array": (list,),
}


def _matches_type(value: Any, types: Any) -> bool:
    names = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    for name in names:
        kinds = _JSON_TYPES.get(name, ())
        if isinstance(value, kinds) and not (isinstance(value, bool) and name in ("integer", "number")):
            return True
    return False


def _ignored_combinations(schema: dict, path: str) -> list[str]:
    found = []
    validation = set(schema) - ANNOTATIONS
    for alone in _ALONE:
        if alone not in schema:
            continue
        others = validation - {alone}
        if alone in ("enum", "const") and "type" in others:
            values = schema.get("enum", []) if alone == "enum" else [schema["const"]]
            if isinstance(values, list) and all(_matches_type(v, schema["type"]) for v in values):
                others.discard("type")
        if others:
            found.append(f"{', '.join(sorted(others))} beside {alone} (only annotations may sit beside it) at {path}")
        break
    lengths = sorted({"minLength", "maxLength"} & validation)
    for exact in ("pattern", "format"):
        if exact in schema and lengths:
            found.append(f"{'/'.join(lengths)} beside {exact} (the {exact} alone is enforced) at {path}")
    return found


def _pointer(path: str, key: str) -> str:
    return f"{path}/{key.replace('~', '~0').replace('/', '~1')}"


def unsupported_schema_features(schema: Any, path: str = "#") -> list[str]:
    """Every keyword of `schema` the grammar cannot enforce, as 'WHAT at JSON-POINTER'."""
    found: list[str] = []
    if isinstance(schema, bool):
        if not schema:
            found.append(f"the schema false (nothing is valid) at {path}")
        return found
    if not isinstance(schema, dict):
        return [f"a schema that is not an object or boolean at {path}"]
    for key, value in schema.items():
        where = _pointer(path, key)
        if key in UNSUPPORTED:
            found.append(f"{UNSUPPORTED[key]} at {where}")
        elif key == "allOf" and isinstance(value, list) and len(value) > 1:
            found.append(f"allOf with {len(value)} subschemas (only one is supported) at {where}")
        elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            found.append(f"a $ref outside the schema ({value!r}) at {where}")
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                found += unsupported_schema_features(sub, _pointer(where, name))
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                found += unsupported_schema_features(sub, f"{where}/{i}")
        elif key in _SCHEMA_VALUES and isinstance(value, dict):  # booleans here are plain rules (items: false)
            found += unsupported_schema_features(value, where)
    return found + _ignored_combinations(schema, path)


def check_schema(schema: Any, param: str) -> None:
    """A 400 naming every unsupported feature of `schema` (param: where the schema sits in the request)."""
    found = unsupported_schema_features(schema)
    if found:
        raise errors.invalid_request(
            f"The JSON schema in '{param}' uses features that constrained decoding cannot enforce: {'; '.join(found)}.",
            param=param,
        )


class StructuredOutputs:
    """The grammar compiler for one engine's tokenizer (built on first use, in a worker thread)."""

    def __init__(self, tokenizer: Any, stop_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self._grammars: Grammars | None = None
        self._lock = asyncio.Lock()

    async def grammars(self) -> "Grammars":
        async with self._lock:
            if self._grammars is None:
                from athena_runtime.grammar import Grammars

                log.info("structured outputs: building the grammar vocabulary of the tokenizer (first use)")
                self._grammars = await asyncio.to_thread(Grammars, self.tokenizer, self.stop_token_ids)
        return self._grammars

    async def compile(self, build: Callable[["Grammars"], "Grammar"], param: str) -> "Grammar":
        """`build(grammars)` in a worker thread; a grammar the library refuses is a 400 on `param`."""
        grammars = await self.grammars()
        try:
            return await asyncio.to_thread(build, grammars)
        except (RuntimeError, ValueError) as exc:  # xgrammar's errors for schemas and structures it cannot use
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise errors.invalid_request(f"Invalid JSON schema in '{param}': {message}", param=param) from None

    async def for_response_format(self, fmt: ResponseFormat | None) -> "Grammar | None":
        """The grammar a response_format asks for (None for text)."""
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return await self.compile(lambda g: g.json_object(), "response_format")
        spec = fmt.json_schema
        assert spec is not None  # ResponseFormat checks it
        schema = {} if spec.json_schema is None else spec.json_schema
        param = "response_format.json_schema.schema"
        check_schema(schema, param)
        return await self.compile(lambda g: g.json_schema(schema if isinstance(schema, dict) else {}, spec.name), param)


def schema_text(schema: Any) -> str:
    """A schema as compact JSON (for prompts and logs)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
