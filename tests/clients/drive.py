"""Drives the gateway with the official `ollama` and `openai` libraries.

Usage: drive.py SCENARIO BASE_URL KEY MODEL

Prints one JSON object on stdout: what the client saw, with the wall-clock
time (time.time()) at which each streamed part arrived. Run by
tests/clients.rs; a library error is reported in the object, not raised.
"""

import json
import sys
import time

import ollama
import openai


def parts_of(stream, text_of):
    out = []
    for part in stream:
        out.append({"at": time.time(), "text": text_of(part), "raw": part.model_dump(mode="json")})
    return out


def run(scenario, base, key, model):
    auth = {"Authorization": f"Bearer {key}"}
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    if scenario.startswith("ollama"):
        client = ollama.Client(host=base + "/ollama", headers=auth)
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
        return {
            "error": e.body.get("error") if isinstance(e.body, dict) else str(e.body),
            "status": e.status_code,
            "kind": type(e).__name__,
            "retry_after": e.response.headers.get("retry-after"),
        }
    return {"error": f"unknown scenario {scenario}"}


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:5])))
