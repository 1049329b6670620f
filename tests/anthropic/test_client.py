"""The official `anthropic` Python client (2.15.0) against a running `herd serve` (started by
crates/herd-cli/tests/openai_client.rs). Usage: test_client.py BASE_URL MODEL API_KEY

Every check raises on failure; the script prints one line per check.
"""
import json
import sys

import anthropic
import jsonschema
from openai import OpenAI

base, model, key = sys.argv[1:4]
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=300)
bearer = anthropic.Anthropic(base_url=base, auth_token=key, max_retries=0, timeout=300)
openai_client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print("ok:", name, flush=True)


system = "Answer in one short sentence."
messages = [{"role": "user", "content": "What colour is the sky?"}]

# Whole and streamed, greedy: one text block, the same as the OpenAI route's answer.
whole = client.messages.create(model=model, max_tokens=12, extra_body={"temperature": 0}, system=system,
                               messages=messages)
check("message shape", whole.type == "message" and whole.role == "assistant"
      and [b.type for b in whole.content] == ["text"], whole)
check("max_tokens stop reason", whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 12,
      whole)
same = openai_client.chat.completions.create(
    model=model, max_tokens=12, temperature=0,
    messages=[{"role": "system", "content": system}] + messages)
check("equals /v1/chat/completions", whole.content[0].text == same.choices[0].message.content,
      f"{whole.content[0].text!r} vs {same.choices[0].message.content!r}")
check("input tokens are the whole prompt", whole.usage.input_tokens == same.usage.prompt_tokens,
      (whole.usage, same.usage))
counted = client.messages.count_tokens(model=model, system=system, messages=messages)
check("count_tokens equals the prompt", counted.input_tokens == whole.usage.input_tokens,
      (counted, whole.usage))
with client.messages.stream(model=model, max_tokens=12, extra_body={"temperature": 0}, system=system,
                            messages=messages) as stream:
    kinds = [e.type for e in stream]
    final = stream.get_final_message()
check("stream event order", kinds[0] == "message_start" and kinds[-1] == "message_stop"
      and "message_delta" in kinds and "content_block_start" in kinds, kinds)
check("streamed equals whole", final.content[0].text == whole.content[0].text
      and final.stop_reason == whole.stop_reason
      and final.usage.output_tokens == whole.usage.output_tokens, final)
check("bearer tokens work too", bearer.messages.create(
    model=model, max_tokens=4, extra_body={"temperature": 0}, messages=messages).type == "message")

# A stop sequence ends the turn and is named.
words = whole.content[0].text.split()
stop = " " + words[2] if len(words) > 2 else words[-1]
r = client.messages.create(model=model, max_tokens=12, extra_body={"temperature": 0}, system=system,
                           messages=messages, stop_sequences=[stop, "NEVER-SEEN"])
check("stop_sequence is reported", r.stop_reason == "stop_sequence" and r.stop_sequence == stop
      and whole.content[0].text.startswith(r.content[0].text), (r, stop))

# output_config.format: JSON that follows the schema, sampled at the default temperature.
colour = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 16}},
          "required": ["colour"], "additionalProperties": False}
r = client.messages.create(model=model, max_tokens=48, system=system, messages=messages,
                           output_config={"format": {"type": "json_schema", "schema": colour},
                                          "effort": "low"})
jsonschema.validate(json.loads(r.content[0].text), colour)
check("output_config.format gives valid JSON", r.stop_reason == "end_turn", r)

# Forced tool calls, whole and streamed: a tool_use block whose input follows the schema.
weather = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"], "additionalProperties": False}}
ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
r = client.messages.create(model=model, max_tokens=64, messages=ask, tools=[weather],
                           tool_choice={"type": "tool", "name": "get_weather"})
uses = [b for b in r.content if b.type == "tool_use"]
check("a forced call is a tool_use block", r.stop_reason == "tool_use" and len(uses) == 1
      and uses[0].name == "get_weather", r)
jsonschema.validate(uses[0].input, weather["input_schema"])
check("its input follows the schema", True)
with client.messages.stream(model=model, max_tokens=64, messages=ask, tools=[weather],
                            tool_choice={"type": "any", "disable_parallel_tool_use": True}) as s:
    final = s.get_final_message()
uses = [b for b in final.content if b.type == "tool_use"]
check("a streamed call arrives whole", final.stop_reason == "tool_use" and len(uses) == 1
      and isinstance(uses[0].input, dict), final)
jsonschema.validate(uses[0].input, weather["input_schema"])

# The round trip: the call and its result sent back, with Claude Code's shapes (system blocks
# with cache_control, a system message inside the conversation).
history = ask + [
    {"role": "assistant", "content": [{"type": "tool_use", "id": uses[0].id, "name": "get_weather",
                                       "input": uses[0].input}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                  "content": "Sunny, 5 C"}]},
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "So, a coat?", "cache_control": {"type": "ephemeral"}}]},
]
r = client.messages.create(model=model, max_tokens=16, extra_body={"temperature": 0}, messages=history,
                           tools=[weather],
                           system=[{"type": "text", "text": "You help with the weather.",
                                    "cache_control": {"type": "ephemeral"}}],
                           thinking={"type": "disabled"}, metadata={"user_id": "u1"})
check("a tool round trip is answered", r.type == "message" and r.stop_reason in
      ("end_turn", "max_tokens", "tool_use"), r)
with_tools = client.messages.count_tokens(model=model, messages=history, tools=[weather])
without = client.messages.count_tokens(model=model, messages=history)
check("count_tokens counts the tools", with_tools.input_tokens > without.input_tokens,
      (with_tools, without))

# Errors: typed by status, in Anthropic's shape.
def raised(call):
    try:
        call()
    except anthropic.APIStatusError as e:
        return type(e).__name__, e.status_code, (e.body or {}).get("error", {})
    return None, 200, None

name, code, err = raised(lambda: client.messages.create(
    model=model, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}]}]))
check("an image is a 400 naming it", name == "BadRequestError" and "image" in err.get("message", ""),
      (name, code, err))
name, code, err = raised(lambda: client.messages.create(model="claude-opus", max_tokens=8,
                                                        messages=messages))
check("an unknown model is 404 not_found_error", name == "NotFoundError"
      and err.get("type") == "not_found_error", (name, code, err))
name, code, err = raised(lambda: anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0)
                         .messages.create(model=model, max_tokens=8, messages=messages))
check("a wrong key is 401", name == "AuthenticationError", (name, code, err))
name, code, err = raised(lambda: client.messages.create(model=model, max_tokens=8, messages=messages,
                                                        extra_body={"container": "c"}))
check("an unknown field is a 400 naming it", code == 400 and "container" in err.get("message", ""),
      (name, code, err))
print("all checks passed")
