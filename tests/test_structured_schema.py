"""The schema check: every keyword or combination the grammar would drop is named with its place;
what the grammar enforces passes."""

from __future__ import annotations

import pytest

from server.structured import unsupported_schema_features

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name"],
}


@pytest.mark.parametrize(
    "schema",
    [
        {},
        True,
        PERSON,
        {"type": "string", "enum": ["a", "b"], "description": "pick one", "title": "T", "default": "a"},
        {"type": ["integer", "null"], "minimum": 0},
        {"$defs": {"P": PERSON}, "type": "object", "properties": {"p": {"$ref": "#/$defs/P", "description": "x"}}},
        {
            "type": "object",
            "properties": {"p": {"allOf": [{"$ref": "#/$defs/P"}], "description": "pydantic"}},
            "$defs": {"P": PERSON},
        },
        {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
        {"type": "array", "prefixItems": [{"type": "string"}], "items": False, "minItems": 1},
        {"type": "string", "pattern": "^[a-z]+$"},
        {"type": "string", "format": "date"},
        {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "maxProperties": 3,
            "propertyNames": {"pattern": "^[a-z]+$"},
        },
    ],
)
def test_enforceable_schemas_pass(schema):
    assert unsupported_schema_features(schema) == []


@pytest.mark.parametrize(
    "schema, found",
    [
        (False, ["the schema false (nothing is valid) at #"]),
        ({"type": "array", "uniqueItems": True}, ["uniqueItems at #/uniqueItems"]),
        ({"type": "object", "properties": {"a/b": {"not": {}}}}, ["not at #/properties/a~1b/not"]),
        ({"if": {}, "then": {}}, ["if/then/else at #/if", "if/then/else at #/then"]),
        ({"oneOf": [{"type": "integer"}]}, ["oneOf (use anyOf) at #/oneOf"]),
        (
            {"allOf": [{"type": "integer"}, {"minimum": 1}]},
            ["allOf with 2 subschemas (only one is supported) at #/allOf"],
        ),
        (
            {"$ref": "https://example.com/s.json"},
            ["a $ref outside the schema ('https://example.com/s.json') at #/$ref"],
        ),
        ({"type": "string", "nullable": True}, ['nullable (OpenAPI; use "type": [..., "null"]) at #/nullable']),
        ({"type": "object", "patternProperties": {"^x": {}}}, ["patternProperties at #/patternProperties"]),
        ({"type": "array", "items": {"type": "array", "contains": {"const": 1}}}, ["contains at #/items/contains"]),
        ({"$defs": {"D": {"dependentRequired": {"a": ["b"]}}}}, ["dependentRequired at #/$defs/D/dependentRequired"]),
        ({"type": "integer", "enum": ["a"]}, ["type beside enum (only annotations may sit beside it) at #"]),
        ({"const": 3, "maximum": 2}, ["maximum beside const (only annotations may sit beside it) at #"]),
        (
            {"$ref": "#/$defs/P", "minimum": 1, "$defs": {"P": {}}},
            ["minimum beside $ref (only annotations may sit beside it) at #"],
        ),
        (
            {"anyOf": [{"type": "integer"}], "type": "integer"},
            ["type beside anyOf (only annotations may sit beside it) at #"],
        ),
        (
            {"type": "string", "format": "email", "maxLength": 30},
            ["maxLength beside format (the format alone is enforced) at #"],
        ),
        (
            {"type": "string", "pattern": "^a", "minLength": 1, "maxLength": 3},
            ["maxLength/minLength beside pattern (the pattern alone is enforced) at #"],
        ),
        (
            {"anyOf": [{"type": "string", "uniqueItems": True}, {"prefixItems": [{"not": {}}]}]},
            ["uniqueItems at #/anyOf/0/uniqueItems", "not at #/anyOf/1/prefixItems/0/not"],
        ),
    ],
)
def test_what_the_grammar_would_drop_is_named_where_it_is(schema, found):
    assert unsupported_schema_features(schema) == found
