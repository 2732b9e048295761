"""Drives the gateway with the official `ollama`, `openai` and `anthropic`
libraries.

Usage: drive.py BASE_URL SCENARIO KEY MODEL [SCENARIO KEY MODEL ...]

Runs the scenarios in order and prints a JSON list on stdout, one object
per scenario: what the client saw, with the wall-clock time (time.time())
at which each streamed part arrived. Run by tests/clients.rs; a library
error is reported in the object, not raised. Each scenario imports only
its own library, once per run: imports take most of a run's time.
"""

import json
import sys
import time


def parts_of(stream, text_of):
    out = []
    for part in stream:
        out.append({"at": time.time(), "text": text_of(part), "raw": part.model_dump(mode="json")})
    return out


def run_ollama(scenario, base, key, model, messages):
    import ollama

    client = ollama.Client(host=base + "/ollama", headers={"Authorization": f"Bearer {key}"})
    try:
        if scenario == "ollama-chat-stream":
            parts = parts_of(
                client.chat(model=model, messages=messages, stream=True),
                lambda p: p.message.content,
            )
            return {"parts": parts}
        if scenario == "ollama-generate":
            r = client.generate(model=model, prompt="Why is the sky blue?", stream=False)
            return {"response": r.response, "prompt_eval_count": r.prompt_eval_count, "eval_count": r.eval_count}
        if scenario == "ollama-list":
            return {"models": [m.model for m in client.list().models]}
        if scenario == "ollama-chat":
            r = client.chat(model=model, messages=messages)
            return {"content": r.message.content, "eval_count": r.eval_count}
    except ollama.ResponseError as e:
        return {"error": e.error, "status": e.status_code}
    return {"error": f"unknown scenario {scenario}"}


def run_openai(scenario, base, key, model, messages):
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    try:
        if scenario in ("openai-stream", "openai-stream-usage"):
            extra = {"stream_options": {"include_usage": True}} if scenario == "openai-stream-usage" else {}
            stream = client.chat.completions.create(model=model, messages=messages, stream=True, **extra)
            parts = parts_of(stream, lambda c: c.choices[0].delta.content if c.choices else None)
            return {"parts": parts}
        if scenario == "openai-chat":
            r = client.chat.completions.create(model=model, messages=messages)
            return {"content": r.choices[0].message.content, "usage": r.usage.model_dump(mode="json")}
        if scenario == "openai-models":
            return {"models": [m.id for m in client.models.list()]}
        if scenario == "openai-embed":
            r = client.embeddings.create(model=model, input="hello")
            return {"dims": len(r.data[0].embedding), "usage": r.usage.model_dump(mode="json")}
    except openai.APIStatusError as e:
        # The library hands over the body's `error` object as `body`.
        return {
            "error": e.body.get("message") if isinstance(e.body, dict) else str(e.body),
            "type": e.type,
            "code": e.code,
            "status": e.status_code,
            "kind": type(e).__name__,
            "retry_after": e.response.headers.get("retry-after"),
        }
    return {"error": f"unknown scenario {scenario}"}


def run_anthropic(scenario, base, key, model, messages):
    import anthropic

    if scenario == "anthropic-no-key":
        # No key at all: the library wants the header left out explicitly.
        client = anthropic.Anthropic(
            base_url=base + "/anthropic",
            api_key=None,
            auth_token=None,
            default_headers={"Authorization": anthropic.Omit()},
            max_retries=0,
        )
    else:
        client = anthropic.Anthropic(base_url=base + "/anthropic", api_key=key, max_retries=0)
    try:
        if scenario == "anthropic-stream":
            stream = client.messages.create(model=model, max_tokens=64, messages=messages, stream=True)
            parts = parts_of(stream, lambda e: e.delta.text if e.type == "content_block_delta" else None)
            return {"parts": parts, "types": [p["raw"]["type"] for p in parts]}
        if scenario in ("anthropic-message", "anthropic-no-key"):
            r = client.messages.create(model=model, max_tokens=64, messages=messages)
            return {"model": r.model, "text": r.content[0].text, "usage": r.usage.model_dump(mode="json")}
        if scenario == "anthropic-count":
            r = client.messages.count_tokens(model=model, messages=messages)
            return {"input_tokens": r.input_tokens}
    except anthropic.APIStatusError as e:
        error = e.body.get("error", {}) if isinstance(e.body, dict) else {}
        return {
            "error": error.get("message"),
            "type": error.get("type"),
            "status": e.status_code,
            "kind": type(e).__name__,
            "retry_after": e.response.headers.get("retry-after"),
        }
    return {"error": f"unknown scenario {scenario}"}


def run(scenario, base, key, model):
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    family = scenario.split("-")[0]
    runner = {"ollama": run_ollama, "openai": run_openai, "anthropic": run_anthropic}.get(family)
    if runner is None:
        return {"error": f"unknown scenario {scenario}"}
    return runner(scenario, base, key, model, messages)


if __name__ == "__main__":
    base, rest = sys.argv[1], sys.argv[2:]
    steps = [rest[i : i + 3] for i in range(0, len(rest), 3)]
    print(json.dumps([run(scenario, base, key, model) for scenario, key, model in steps]))
