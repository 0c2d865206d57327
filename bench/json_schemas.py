"""The JSON schemas of bench/structured_outputs.py.

    wide_schema(variant)    50 properties of mixed types (strings with maxLength, bounded
                            integers and numbers, booleans, enums, arrays with maxItems,
                            nested objects), for timing grammar compiles; each variant
                            renames one property, so that no two variants share a cache key
    example_instance(s)     the smallest obvious value that satisfies schema s (a valid
                            prefix to feed a matcher up to a mid-object position)
    SUBJECT_SCHEMAS         16 small schemas, each with subjects to describe, for the served
                            requests; `json_prompts(n)` turns them into n distinct chats

Every served schema is bounded, so that a constrained output always closes: strings have
a maxLength, arrays a maxItems, numbers a `multipleOf` of 0.5 (without one a number may
take any number of decimals; 0.5 is exact in binary, so the validator's division agrees),
every property is required and no other is allowed (OpenAI's strict mode asks the same).
"""

from __future__ import annotations

from typing import Any, NamedTuple

WIDE_PROPERTIES = 50


def text(max_length: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": max_length}


def integer(minimum: int, maximum: int) -> dict:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def halves(minimum: float, maximum: float) -> dict:
    return {"type": "number", "minimum": minimum, "maximum": maximum, "multipleOf": 0.5}


def one_of(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


def list_of(items: dict, max_items: int) -> dict:
    return {"type": "array", "items": items, "minItems": 1, "maxItems": max_items}


def record(**properties: dict) -> dict:
    """An object with exactly `properties`, all required, in this order."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


# The wide schema's property kinds, in the order they repeat.
_WIDE_KINDS = (
    ("name", lambda i: text(16 + i % 5 * 8)),
    ("count", lambda i: integer(0, 10 ** (2 + i % 4))),
    ("score", lambda i: {"type": "number", "minimum": -100.0, "maximum": 100.0 + i}),
    ("flag", lambda i: {"type": "boolean"}),
    ("level", lambda i: one_of("low", "medium", "high", f"level-{i}")),
    ("tags", lambda i: list_of(text(12), 2 + i % 4)),
    ("detail", lambda i: record(label=text(20), size=integer(1, 64), enabled={"type": "boolean"})),
)


def wide_schema(variant: int = 0, properties: int = WIDE_PROPERTIES) -> dict:
    """`properties` properties cycling through the kinds above; variant v renames the first
    one (`name_00` becomes `name_00_vV`), every other part is the same."""
    fields = {}
    for i in range(properties):
        kind, make = _WIDE_KINDS[i % len(_WIDE_KINDS)]
        name = f"{kind}_{i:02d}" + (f"_v{variant}" if i == 0 and variant else "")
        fields[name] = make(i)
    return {"title": "wide record", **record(**fields)}


def example_instance(schema: dict) -> Any:
    """The smallest obvious valid value of `schema` (the keywords the schemas here use)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema["type"]
    if kind == "object":
        return {name: example_instance(sub) for name, sub in schema["properties"].items()}
    if kind == "array":
        return [example_instance(schema["items"])] * max(1, schema.get("minItems", 0))
    if kind == "string":
        return "a" * max(1, schema.get("minLength", 0))
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    raise ValueError(f"example_instance does not know schema type {kind!r}")


class SubjectSchema(NamedTuple):
    name: str  # also the response_format's json_schema name
    schema: dict
    subjects: tuple[str, ...]  # what a prompt asks to describe, one per prompt


_COUNTRIES = one_of("Africa", "Antarctica", "Asia", "Europe", "North America", "Oceania", "South America")

SUBJECT_SCHEMAS = (
    SubjectSchema("person", record(name=text(40), born=integer(1000, 2025), occupation=text(40),
                                   known_for=list_of(text(40), 3)),
                  ("Marie Curie", "Ada Lovelace", "Leonardo da Vinci", "Nelson Mandela")),
    SubjectSchema("book", record(title=text(60), author=record(name=text(40), born=integer(1000, 2025)),
                                 year=integer(1000, 2025), genre=one_of("novel", "poetry", "drama", "essay",
                                                                        "science", "history", "children")),
                  ("Moby-Dick", "Pride and Prejudice", "The Origin of Species", "Don Quixote")),
    SubjectSchema("city", record(name=text(40), country=text(40), continent=_COUNTRIES,
                                 population=integer(0, 40_000_000), is_capital={"type": "boolean"},
                                 landmarks=list_of(text(40), 3)),
                  ("Paris", "Tokyo", "Nairobi", "Buenos Aires")),
    SubjectSchema("recipe", record(dish=text(40), cuisine=text(24), servings=integer(1, 12),
                                   vegetarian={"type": "boolean"}, ingredients=list_of(text(24), 5)),
                  ("pancakes", "a tomato soup", "guacamole", "a mushroom risotto")),
    SubjectSchema("movie", record(title=text(60), director=text(40), year=integer(1890, 2025),
                                  rating=halves(0, 10), genres=list_of(one_of(
                                      "action", "comedy", "drama", "animation", "science fiction",
                                      "documentary", "thriller", "romance"), 3)),
                  ("Casablanca", "Spirited Away", "Jurassic Park", "Modern Times")),
    SubjectSchema("product", record(name=text(40), category=text(24), price=halves(0, 10_000),
                                    currency=one_of("USD", "EUR", "GBP", "JPY"), in_stock={"type": "boolean"}),
                  ("a stainless steel kettle", "a pair of running shoes", "a laptop backpack", "a desk lamp")),
    SubjectSchema("planet", record(name=text(24), kind=one_of("rocky", "gas giant", "ice giant", "dwarf"),
                                   moons=integer(0, 200), has_rings={"type": "boolean"},
                                   distance_au=halves(0, 100)),
                  ("Mars", "Jupiter", "Neptune", "Venus")),
    SubjectSchema("animal", record(name=text(32), animal_class=one_of("mammal", "bird", "reptile", "amphibian",
                                                                      "fish", "insect"),
                                   diet=one_of("herbivore", "carnivore", "omnivore"), habitat=text(40),
                                   lifespan_years=integer(0, 300)),
                  ("the red fox", "the emperor penguin", "the green sea turtle", "the honey bee")),
    SubjectSchema("car", record(make=text(24), model=text(24), year=integer(1885, 2025),
                                fuel=one_of("petrol", "diesel", "electric", "hybrid"), seats=integer(1, 9)),
                  ("the Volkswagen Beetle", "the Ford Model T", "the Tesla Model 3", "the Fiat 500")),
    SubjectSchema("country", record(name=text(40), capital=text(40), continent=_COUNTRIES,
                                    languages=list_of(text(24), 3), population=integer(0, 2_000_000_000)),
                  ("Japan", "Brazil", "Kenya", "Norway")),
    SubjectSchema("song", record(title=text(60), artist=text(40), year=integer(1900, 2025),
                                 duration_seconds=integer(1, 3600),
                                 genre=one_of("pop", "rock", "jazz", "classical", "folk", "hip hop", "blues")),
                  ("Yesterday by the Beatles", "Bohemian Rhapsody", "What a Wonderful World", "Hey Jude")),
    SubjectSchema("event", record(name=text(60), year=integer(-3000, 2025), place=text(40),
                                  summary=text(100)),
                  ("the first Moon landing", "the fall of the Berlin Wall", "the signing of the Magna Carta",
                   "the first modern Olympic Games")),
    SubjectSchema("company", record(name=text(40), founded=integer(1600, 2025), headquarters=text(40),
                                    industry=one_of("technology", "retail", "energy", "finance", "automotive",
                                                    "food", "entertainment", "other"),
                                    products=list_of(text(32), 3)),
                  ("a small bakery", "an electric bicycle maker", "a video game studio", "a coffee roaster")),
    SubjectSchema("sport", record(name=text(32), team_sport={"type": "boolean"}, players_per_side=integer(1, 15),
                                  equipment=list_of(text(24), 3), olympic={"type": "boolean"}),
                  ("football", "tennis", "basketball", "curling")),
    SubjectSchema("language", record(name=text(24), year=integer(1940, 2025), creator=text(40),
                                     typing=one_of("static", "dynamic"),
                                     paradigms=list_of(one_of("imperative", "object-oriented", "functional",
                                                              "logic", "procedural"), 3)),
                  ("the Python programming language", "the C programming language", "Haskell", "JavaScript")),
    SubjectSchema("weather", record(city=text(40), temperature_c=halves(-90, 60),
                                    condition=one_of("sunny", "cloudy", "rain", "snow", "storm", "fog"),
                                    humidity_percent=integer(0, 100), wind=record(speed_kph=integer(0, 400),
                                                                                  direction=one_of(
                                                                                      "N", "NE", "E", "SE", "S",
                                                                                      "SW", "W", "NW"))),
                  ("a summer afternoon in Madrid", "a winter morning in Oslo", "a monsoon day in Mumbai",
                   "a spring evening in Chicago")),
)


class JsonPrompt(NamedTuple):
    """One served request: a chat asking for JSON, and the schema its answer should match."""

    messages: list[dict]
    schema_name: str
    schema: dict


def prompt_text(subject_schema: SubjectSchema, subject: str) -> str:
    fields = ", ".join(subject_schema.schema["properties"])
    return (f"Describe {subject} as a JSON object with the fields {fields}. "
            "Answer with the JSON object only.")


def json_prompts(n: int) -> list[JsonPrompt]:
    """n chats: prompt i describes subject i // 16 of schema i % 16, so that consecutive
    prompts use different schemas; past the 64 subjects, later rounds are numbered so that
    no two prompts are the same."""
    per_round = len(SUBJECT_SCHEMAS) * len(SUBJECT_SCHEMAS[0].subjects)
    prompts = []
    for i in range(n):
        entry = SUBJECT_SCHEMAS[i % len(SUBJECT_SCHEMAS)]
        subject = entry.subjects[i // len(SUBJECT_SCHEMAS) % len(entry.subjects)]
        content = prompt_text(entry, subject)
        if i >= per_round:
            content = f"({i // per_round + 1}) {content}"
        prompts.append(JsonPrompt([{"role": "user", "content": content}], entry.name, entry.schema))
    return prompts
