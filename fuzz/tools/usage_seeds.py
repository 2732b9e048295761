#!/usr/bin/env python3
"""Writes the seeds of the body readers' targets (usage_scan, request_model,
model_list) into seeds/<target>/. Run from fuzz/: python3 tools/usage_seeds.py

Every input starts with a mode byte and a count of cut points (mod 16),
then that many little-endian u16 cut points (see
fuzz_targets/usage_common.rs); the rest is the body (raw modes) or bytes
that `arbitrary` builds a body from (generated modes: a few fixed
pseudo-random bytes here, which the fuzzer mutates).
"""

import json
import os
import random
import struct

random.seed(20)


def seed(target, name, mode, cuts, rest):
    if isinstance(rest, str):
        rest = rest.encode()
    head = bytes([mode, len(cuts)]) + b"".join(struct.pack("<H", c) for c in cuts)
    os.makedirs(f"seeds/{target}", exist_ok=True)
    with open(f"seeds/{target}/{name}", "wb") as f:
        f.write(head + rest)


def noise(n):
    return bytes(random.randrange(256) for _ in range(n))


def compact(v):
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------------------
# usage_scan. Mode: bits 0-2 framing (0 NDJSON, 1 Ollama JSON, 2 OpenAI
# JSON, 3 SSE, 4 SSE through the hider, 5 opaque), 3 header variant,
# 4 generated, 5-7 all set: repeated 16 times.

ollama_stream = "".join(
    compact(r) + "\n"
    for r in [
        {"model": "llama3.2", "created_at": "2026-11-29T12:00:00Z", "response": "The", "done": False},
        {"model": "llama3.2", "created_at": "2026-11-29T12:00:00Z", "response": " sky", "done": False},
        {
            "model": "llama3.2",
            "created_at": "2026-11-29T12:00:01Z",
            "response": "",
            "done": True,
            "done_reason": "stop",
            "context": [1, 2, 3],
            "total_duration": 5043500667,
            "prompt_eval_count": 26,
            "eval_count": 290,
        },
    ]
)
chat_stream = "".join(
    compact(r) + "\n"
    for r in [
        {"model": "qwen2", "created_at": "t", "message": {"role": "assistant", "content": "Hi"}, "done": False},
        {
            "model": "qwen2",
            "created_at": "t",
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            "done": False,
        },
        {
            "model": "qwen2",
            "created_at": "t",
            "message": {"role": "assistant", "content": ""},
            "done_reason": "stop",
            "done": True,
            "prompt_eval_count": 12,
            "eval_count": 3,
        },
    ]
)
chunk = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1798761600,
    "model": "qwen2",
    "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
    "usage": None,
}
usage_only = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1798761600,
    "model": "qwen2",
    "choices": [],
    "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
}
sse = "".join(f"data: {compact(e)}\n\n" for e in [chunk, chunk, usage_only]) + "data: [DONE]\n\n"
sse_crlf = (": keep-alive\r\nevent: message\r\n" + sse.replace("\n", "\r\n")).replace("data: ", "data:")
whole = {
    "id": "chatcmpl-2",
    "object": "chat.completion",
    "model": "qwen2",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16},
}
seed("usage_scan", "ollama-stream", 0x00, [], ollama_stream)
seed("usage_scan", "ollama-stream-cut", 0x00, [5, 70, 140], ollama_stream)
seed("usage_scan", "ollama-chat-tools", 0x08, [100], chat_stream)
seed("usage_scan", "ollama-cut-short", 0x00, [], "\n".join(ollama_stream.split("\n")[:2]))
seed(
    "usage_scan",
    "ollama-json",
    0x01,
    [9],
    compact({"model": "m", "message": {"content": "hi"}, "done": True, "prompt_eval_count": 3, "eval_count": 4}),
)
seed("usage_scan", "ollama-embed", 0x01, [], compact({"model": "e", "embeddings": [[0.1, 0.2]], "prompt_eval_count": 8}))
seed("usage_scan", "openai-json", 0x02, [33], json.dumps(whole, indent=2))
seed("usage_scan", "openai-json-folded", 0x0A, [], '{"MODEL":"m","U\\u0073age":{"prompt_tokens":1,"completion_tokens":2}}')
seed("usage_scan", "openai-sse", 0x03, [7, 300], sse)
seed("usage_scan", "openai-sse-crlf", 0x0B, [], sse_crlf)
seed("usage_scan", "openai-sse-hidden", 0x04, [20, 200, 400], sse)
seed("usage_scan", "openai-sse-hidden-crlf", 0x04, [3], sse_crlf)
seed("usage_scan", "opaque-gzip", 0x05, [], b"\x1f\x8b\x08\x00garbage")
seed("usage_scan", "not-json", 0x01, [], "<html>oops</html>")
seed("usage_scan", "repeated-16", 0xE0, [30], ollama_stream)
seed("usage_scan", "repeated-16-sse-hidden", 0xE4, [30], sse)
for i, framing in enumerate([0, 1, 2, 3, 4, 5]):
    seed("usage_scan", f"generated-{i}", 0x10 | framing, [17, 90], noise(160))

# ---------------------------------------------------------------------------
# request_model. Mode: bit 0 API (0 Ollama, 1 OpenAI), 1 generated, 2-4
# all set: repeated 16 times.

chat = {"model": "llama3.2", "messages": [{"role": "user", "content": 'say "model"'}], "stream": True}
seed("request_model", "ollama-chat", 0x00, [4, 30], compact(chat))
seed("request_model", "ollama-name", 0x00, [], '{"name":"llama3.2","MODEL":"qwen2","mod\\u0065l":"x"}')
seed("request_model", "openai-stream", 0x01, [12], json.dumps(chat, indent=2))
seed(
    "request_model",
    "openai-stream-options",
    0x01,
    [],
    compact({"model": "m", "stream": True, "stream_options": {"include_usage": False, "x": 1}}),
)
seed("request_model", "openai-stream-null", 0x01, [], '{"stream_options":null,"stream":true,"model":"m"}')
seed("request_model", "openai-not-stream", 0x01, [], '{"model":"m","stream":false}')
seed("request_model", "two-objects", 0x01, [13], '{"model":"a"}{"model":"b"}')
seed("request_model", "not-json", 0x00, [], "model=llama3.2")
seed("request_model", "unreadable", 0x00, [], '{"model":7,"name":"","model":{"a":1}}')
seed("request_model", "repeated-16", 0x1C, [9], compact(chat))
for i in range(4):
    seed("request_model", f"generated-{i}", 0x02 | (i & 1), [11, 40], noise(120))

# ---------------------------------------------------------------------------
# model_list. Mode: bit 0 endpoint (0 Ollama, 1 OpenAI), 1 readable,
# 2 generated, 3-7 all set: padded to just over the limit. Raw modes: then a byte of pattern mask
# (llama3.2, qwen*, *, mistral:7b, *:LATEST, Llama3.2:latest, *embed*,
# a*b*c).

tags = {
    "models": [
        {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 1, "details": {"family": "llama"}},
        {"name": "mistral:7b", "model": "mistral:7b"},
        {"name": "qwen2.5:7b", "model": "qwen2.5:7b"},
        {"name": "nomic-embed-text", "model": "other"},
        {"size": 3},
    ]
}
models = {
    "object": "list",
    "data": [
        {"id": "qwen2", "object": "model", "created": 1, "owned_by": "library"},
        {"id": "gpt-x", "object": "model"},
        {"id": 7},
        "text",
    ],
}
seed("model_list", "ollama-tags", 0x02, [40], b"\x03" + compact(tags).encode())
seed("model_list", "ollama-tags-pretty", 0x02, [], b"\x48" + json.dumps(tags, indent=2).encode())
seed("model_list", "openai-models", 0x03, [25], b"\x02" + compact(models).encode())
seed("model_list", "openai-models-star", 0x03, [], b"\x84" + compact(models).encode())
seed("model_list", "not-readable", 0x00, [], b"\x04" + compact(tags).encode())
seed("model_list", "not-json", 0x02, [], b"\x04" + b"not json")
seed("model_list", "other-shape", 0x02, [], b"\x04" + b'{"models":{}}')
seed("model_list", "limit-over", 0xFA, [0x00], b"\x04" + compact(tags).encode())
for i in range(4):
    seed("model_list", f"generated-{i}", 0x06 | (i & 1), [8, 30], noise(140))
