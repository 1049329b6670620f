"""Structured output through the official openai client against a running `herd serve` (started
by crates/herd-cli/tests/openai_client.rs): 33 JSON schemas (3 with unbounded numbers) at temperature 1.0 and 0, every
response parsed and validated with the `jsonschema` package; json_object mode; a regex and a Lark
grammar (herd's documented extensions); unsupported keywords and malformed schemas as 400s.
Usage: test_structured.py BASE_URL MODEL API_KEY
"""
import json
import re
import sys

import jsonschema
import openai
from openai import OpenAI

base, model, key = sys.argv[1:4]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)

S = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}},
     "required": ["score"]},
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}},
     "required": ["n"]},
    {"type": "object", "properties": {"address": {"type": "object", "properties": {
        "street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["street", "city", "zip"], "additionalProperties": False}}, "required": ["address"]},
    {"type": "object", "properties": {"email": {"type": "string", "format": "email", "maxLength": 40}},
     "required": ["email"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}}, "required": ["when"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
     "required": ["code"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 5},
    {"type": "array", "prefixItems": [{"type": "string", "maxLength": 10}, {"type": "integer", "maximum": 99,
     "minimum": 0}], "items": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -50,
     "maximum": 50}, "y": {"type": "integer", "minimum": -50, "maximum": 50}}, "required": ["kind", "x", "y"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
     {"type": "boolean"}]}}, "required": ["value"]},
    {"type": "object", "properties": {"pet": {"oneOf": [
        {"type": "object", "properties": {"cat": {"const": True}}, "required": ["cat"], "additionalProperties": False},
        {"type": "object", "properties": {"dog": {"const": True}}, "required": ["dog"], "additionalProperties": False}]}},
     "required": ["pet"]},
    {"type": "object", "properties": {"first": S, "last": S, "middle": S}, "required": ["first", "last"],
     "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {"type": "object",
     "properties": {"sku": {"type": "string", "pattern": "^[a-z]{2}[0-9]{2}$"}, "qty": {"type": "integer",
     "minimum": 1, "maximum": 10}}, "required": ["sku", "qty"], "additionalProperties": False}}},
     "required": ["items"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000,
     "multipleOf": 0.5}}, "required": ["price"]},
    {"type": "object", "properties": {"even": {"type": "integer", "multipleOf": 2, "minimum": 0, "maximum": 100}},
     "required": ["even"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {"type": "array",
     "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3, "max"]}}, "required": ["level"]},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 20}},
     "required": ["note"]},
    {"$defs": {"name": {"type": "string", "maxLength": 16}}, "type": "object",
     "properties": {"a": {"$ref": "#/$defs/name"}, "b": {"$ref": "#/$defs/name"}}, "required": ["a", "b"]},
    {"type": "object", "properties": {"flags": {"type": "object", "additionalProperties": {"type": "boolean"},
     "maxProperties": 3}}, "required": ["flags"]},
    {"type": "object", "properties": {"ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "multipleOf": 0.001}},
     "required": ["ratio"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8,
     "pattern": "^[a-z]+$"}}, "required": ["word"]},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
     "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["answer", "confidence"],
     "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer",
     "minimum": 1, "maximum": 9999}, "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]},
     "maxItems": 3}}, "required": ["id", "roles"]}, "active": {"type": "boolean"}}, "required": ["user", "active"]},
]
# Numbers with no bounds at all (issue 17 item 6): a small model at temperature 0 wrote
# `0.4000000…` until max_tokens; herd bounds the digits of JSON numbers, so these must stop.
SCHEMAS += [
    {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"},
     "z": {"type": "integer"}}, "required": ["x", "y", "z"]},
    {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
    {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
     "lon": {"type": "number", "minimum": -180, "maximum": 180}, "alt": {"type": "number"}},
     "required": ["lat", "lon", "alt"]},
]
assert len(SCHEMAS) >= 33


def closed(schema):
    """Objects without an explicit additionalProperties get `false`, as OpenAI's strict mode
    requires: an open object lets a small base model add properties until max_tokens."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            closed(v)
    elif isinstance(schema, list):
        for v in schema:
            closed(v)
    return schema


SCHEMAS = [closed(s) for s in SCHEMAS]

def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print("ok:", name, flush=True)

valid, total, mask_checked = 0, 0, 0
for i, schema in enumerate(SCHEMAS):
    for temperature in (1.0, 0.0):
        r = client.chat.completions.create(
            model=model, max_tokens=400, temperature=temperature, seed=i,
            messages=[{"role": "user", "content": "Reply with JSON only."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                     "strict": True}})
        c = r.choices[0]
        total += 1
        if c.finish_reason != "stop":
            raise AssertionError(f"schema {i} at T={temperature}: finish_reason {c.finish_reason}: {c.message.content!r}")
        value = json.loads(c.message.content)
        jsonschema.validate(value, schema)
        valid += 1
check(f"{valid}/{total} responses parse and validate (33 schemas, temperature 1.0 and 0)", valid == total)

# json_object: any object. Open objects let a base model go on adding properties; a response
# that hits max_tokens must say so (finish_reason "length"), one that stops must parse.
complete = 0
for seed in range(4):
    r = client.completions.create(model=model, prompt='A JSON object with a name and an age: ', max_tokens=300,
                                  temperature=0.7, seed=seed,
                                  extra_body={"response_format": {"type": "json_object"}})
    c = r.choices[0]
    if c.finish_reason == "stop":
        check(f"json_object mode (seed {seed}) gives a JSON object", isinstance(json.loads(c.text), dict), c.text)
        complete += 1
    else:
        check(f"json_object mode (seed {seed}) cut off is reported as length",
              c.finish_reason == "length" and r.usage.completion_tokens == 300)
check("json_object mode completes at least once in four", complete >= 1)

r = client.completions.create(model=model, prompt="Today's date:", max_tokens=20, temperature=1.0, seed=2,
                              extra_body={"guided_regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"})
check("guided_regex", re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r.choices[0].text) is not None, r.choices[0].text)

lark = 'start: "The answer is " ("yes" | "no") "."'
r = client.completions.create(model=model, prompt="Q: Is water wet?", max_tokens=20, temperature=1.0, seed=3,
                              extra_body={"guided_grammar": lark})
check("guided_grammar (Lark)", r.choices[0].text in ("The answer is yes.", "The answer is no."), r.choices[0].text)

# Streaming under a schema: the concatenated deltas are valid JSON too.
stream = client.chat.completions.create(
    model=model, max_tokens=400, temperature=1.0, seed=5, stream=True,
    messages=[{"role": "user", "content": "JSON please"}],
    response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}})
text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
jsonschema.validate(json.loads(text), SCHEMAS[0])
check("streamed structured output validates", True)

def bad(name, rf, needle):
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=5, response_format=rf)
    except openai.BadRequestError as e:
        check(name, needle in str(e), str(e))
        return
    raise AssertionError(f"{name}: accepted")

bad("unsupported keyword is a 400 naming it",
    {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}}},
    "uniqueItems")
bad("conditional keywords are a 400",
    {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "object", "if": {"required": ["a"]},
                                                                    "then": {"required": ["b"]}}}}, "if")
bad("malformed schema is a 400",
    {"type": "json_schema", "json_schema": {"name": "m", "schema": {"type": "object", "properties": 5}}},
    "properties")
bad("missing schema is a 400", {"type": "json_schema", "json_schema": {"name": "m"}}, "schema")
bad("unknown response_format type is a 400", {"type": "yaml"}, "yaml")
print("all checks passed")
