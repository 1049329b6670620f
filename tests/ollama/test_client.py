"""The official `ollama` Python client (0.6.3) against a running `herd serve` (started by
crates/herd-cli/tests/openai_client.rs). Usage: test_client.py BASE_URL MODEL API_KEY

Every check raises on failure; the script prints one line per check.
"""
import json
import sys

import jsonschema
import ollama
from openai import OpenAI

base, model, key = sys.argv[1:4]
auth = {"Authorization": f"Bearer {key}"}
client = ollama.Client(host=base, headers=auth, timeout=300)
openai_client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print("ok:", name, flush=True)


# Listings.
listed = client.list().models
check("list names the served model", [m.model for m in listed] == [model], listed)
check("list details", listed[0].details.quantization_level == "Q4_K_M"
      and listed[0].details.family == "gemma3" and listed[0].size > 200_000_000, listed[0])
shown = client.show(model)
check("show gives model info", shown.modelinfo["general.architecture"] == "gemma3"
      and shown.modelinfo["general.parameter_count"] > 260_000_000, shown.modelinfo)
check("show names capabilities", "completion" in (shown.capabilities or []), shown.capabilities)
running = client.ps().models
check("ps lists the loaded model", [m.model for m in running] == [model], running)

# Generate, raw: the completions path, whole and streamed, greedy.
prompt = "The old lighthouse keeper"
options = {"temperature": 0, "num_predict": 12}
whole = client.generate(model=model, prompt=prompt, raw=True, options=options)
check("generate is done with length", whole.done and whole.done_reason == "length", whole)
check("generate counts tokens", whole.eval_count == 12 and whole.prompt_eval_count >= 0, whole)
check("generate times are nanoseconds", whole.total_duration >= whole.eval_duration > 0, whole)
same = openai_client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
check("generate equals /v1/completions", whole.response == same.choices[0].text,
      f"{whole.response!r} vs {same.choices[0].text!r}")
parts = list(client.generate(model=model, prompt=prompt, raw=True, options=options, stream=True))
check("streamed generate equals the whole",
      "".join(p.response for p in parts) == whole.response and parts[-1].done
      and not any(p.done for p in parts[:-1]), parts[-1])

# Chat through the template, whole and streamed; equal to the OpenAI route.
messages = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What colour is the sky?"}]
whole = client.chat(model=model, messages=messages, options=options)
check("chat message shape", whole.message.role == "assistant" and whole.done, whole)
same = openai_client.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                             temperature=0)
check("chat equals /v1/chat/completions", whole.message.content == same.choices[0].message.content,
      f"{whole.message.content!r} vs {same.choices[0].message.content!r}")
parts = list(client.chat(model=model, messages=messages, options=options, stream=True))
check("streamed chat equals the whole",
      "".join(p.message.content or "" for p in parts) == whole.message.content
      and parts[-1].done_reason == whole.done_reason)

# Structured output: a schema, sampled, valid every time.
schema = {"type": "object",
          "properties": {"colour": {"type": "string", "maxLength": 20},
                         "certain": {"type": "boolean"}},
          "required": ["colour", "certain"], "additionalProperties": False}
for seed in range(3):
    r = client.chat(model=model, messages=messages, format=schema,
                    options={"temperature": 1.0, "seed": seed, "num_predict": 64})
    value = json.loads(r.message.content)
    jsonschema.validate(value, schema)
check("format with a schema gives valid JSON", True)
r = client.generate(model=model, prompt="A JSON object describing a cat:", format="json",
                    options={"seed": 1, "num_predict": 64})
check("format json gives a JSON object", isinstance(json.loads(r.response), dict), r.response)

# A conversation with tools, a call and its result, as the client sends it back.
def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
      city: The city's name.
    """
    return "sunny"

history = [{"role": "user", "content": "Weather in Oslo?"},
           ollama.Message(role="assistant", content="", tool_calls=[
               ollama.Message.ToolCall(function=ollama.Message.ToolCall.Function(
                   name="get_weather", arguments={"city": "Oslo"}))]),
           {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
r = client.chat(model=model, messages=history, tools=[get_weather], options=options)
check("a tool round trip is accepted", r.done and r.message.role == "assistant", r)

# Errors: typed statuses and Ollama's message.
def status_of(call):
    try:
        call()
    except ollama.ResponseError as e:
        return e.status_code, e.error
    return 200, None

code, err = status_of(lambda: client.chat(model="no-such-model", messages=messages))
check("unknown model is 404", code == 404 and "not found" in err, (code, err))
code, err = status_of(lambda: client.chat(model=model, messages=messages,
                                          options={"mirostat": 2}))
check("an unsupported option is a 400 naming it", code == 400 and "mirostat" in err, (code, err))
code, err = status_of(lambda: client.generate(model=model, prompt="x", images=["aGk="]))
check("images are a 400 naming them", code == 400 and "images" in err, (code, err))
code, err = status_of(lambda: ollama.Client(host=base).list())
check("a missing key is 401", code == 401, (code, err))
pulled = client.pull(model)
check("pulling the served model succeeds", pulled.status == "success", pulled)
print("all checks passed")
