"""Varied JSON schemas for structured-output tests: nested objects, enums, arrays, strings
and numbers with bounds. `varied_schemas(n)` is deterministic; every schema is bounded
(string lengths, array sizes, nesting), so that even a small model's output closes well
inside a few hundred tokens."""

from __future__ import annotations

import random

_WORDS = ["name", "title", "city", "country", "color", "status", "owner", "kind", "label", "author",
          "genre", "planet", "tool", "food", "team", "river", "language", "animal", "brand", "mood"]
_ENUMS = [["red", "green", "blue"], ["low", "medium", "high"], ["yes", "no"], ["cat", "dog", "bird", "fish"],
          ["north", "south", "east", "west"], ["draft", "final"]]


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.choice([8, 16, 24, 32])}
    if kind == "integer":
        low = rng.choice([0, 1, -10, 1900])
        return {"type": "integer", "minimum": low, "maximum": low + rng.choice([9, 100, 1000])}
    if kind == "number":
        return {"type": "number", "minimum": rng.choice([-1.0, 0.0]), "maximum": rng.choice([1.0, 100.0])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.choice(_ENUMS)}
    return {"type": "array", "maxItems": rng.choice([2, 3, 4]), "items": rng.choice([
        {"type": "string", "maxLength": 12}, {"type": "integer", "minimum": 0, "maximum": 99},
        {"enum": rng.choice(_ENUMS)}])}


def _object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(_WORDS, rng.randint(1, 4))
    properties = {name: (_object(rng, depth - 1) if depth > 0 and rng.random() < 0.3 else _leaf(rng))
                  for name in names}
    required = [n for n in names if rng.random() < 0.8] or names[:1]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def varied_schemas(n: int, seed: int = 0) -> list[dict]:
    """n schemas: mostly objects (some nested two deep), some top-level arrays of objects."""
    rng = random.Random(seed)
    schemas = []
    for i in range(n):
        if i % 10 == 9:
            schemas.append({"type": "array", "minItems": 1, "maxItems": 3, "items": _object(rng, 0)})
        else:
            schemas.append(_object(rng, 2 if i % 3 == 0 else 1))
    return schemas
