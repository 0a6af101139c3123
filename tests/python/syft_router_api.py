"""Drives a router's syft-llm-router endpoints (POST /chat, POST /search, GET /health) the way a
Python client of syft-llm-router would: request bodies built from its Pydantic field names, once in
camelCase (what its models send, by alias) and once in snake_case (which they accept too), with
the standard library only. Usage:
  syft_router_api.py ROUTER_HTTP_URL USER TOKEN POOR_USER POOR_TOKEN PRICE_MICROS
Exits non-zero on the first failure; prints "router api: ok" at the end."""

import json
import sys
import urllib.error
import urllib.request

url, user, token, poor_user, poor_token, price = sys.argv[1:7]
price = int(price)


def check(condition, message):
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def camel(snake):
    head, *rest = snake.split("_")
    return head + "".join(p.title() for p in rest)


def shaped(obj, style):
    """The same request in camelCase (syft-llm-router's aliases) or snake_case."""
    if isinstance(obj, dict):
        key = camel if style == "camel" else (lambda k: k)
        return {key(k): shaped(v, style) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shaped(v, style) for v in obj]
    return obj


status, health = call("GET", "/health")
check(status == 200 and health["status"] == "healthy", f"health: {status} {health}")
check(health["project_name"] == "test-router", f"project_name: {health}")
check({"chat", "search"} <= set(health["services"]), f"services: {health['services']}")
check(health["services"]["search"]["status"] == "running", f"search state: {health}")

for style in ("camel", "snake"):
    search = shaped(
        {
            "user_email": user,
            "query": "ledger capture",
            "options": {"limit": 2, "similarity_threshold": 0.0, "include_metadata": True},
            "transaction_token": token,
        },
        style,
    )
    status, body = call("POST", "/search", search)
    check(status == 200, f"search ({style}): {status} {body}")
    check(body["query"] == "ledger capture", f"query echoed: {body}")
    check(1 <= len(body["results"]) <= 2, f"results ({style}): {body['results']}")
    first = body["results"][0]
    check({"id", "score", "content", "metadata"} <= set(first), f"result shape: {first}")
    check(0 < first["score"] <= 1, f"score: {first}")
    check(isinstance(first["metadata"], dict), f"metadata: {first}")
    check(body["providerInfo"]["provider"] == "embedded", f"providerInfo: {body}")
    check(body["cost"]["amountMicros"] == price and body["cost"]["currency"] == "USD", f"cost: {body}")

    chat = shaped(
        {
            "user_email": user,
            "model": "test-model",
            "messages": [{"role": "user", "content": f"hello in {style}"}],
            "options": {"max_tokens": 50, "temperature": 0.5, "top_p": 0.9, "stop_sequences": ["zz"]},
            "transaction_token": token,
        },
        style,
    )
    status, body = call("POST", "/chat", chat)
    check(status == 200, f"chat ({style}): {status} {body}")
    check(body["message"]["role"] == "assistant" and body["message"]["content"], f"message: {body}")
    check(body["finishReason"] == "stop", f"finishReason: {body}")
    check(body["usage"]["totalTokens"] == body["usage"]["promptTokens"] + body["usage"]["completionTokens"], f"usage: {body}")
    check(body["cost"]["amountMicros"] == price, f"chat cost: {body}")

status, body = call("POST", "/search", {"userEmail": user, "query": "zebra", "transactionToken": token})
check(status == 200 and body["results"] == [] and body["cost"]["amountMicros"] == 0, f"empty search: {status} {body}")

refusals = [
    ("no token", "/search", {"userEmail": user, "query": "ledger"}, 402),
    ("bad token", "/search", {"userEmail": user, "query": "ledger", "transactionToken": "nope"}, 403),
    ("poor user", "/search", {"userEmail": poor_user, "query": "ledger", "transactionToken": poor_token}, 409),
    ("empty query", "/search", {"userEmail": user, "query": " ", "transactionToken": token}, 400),
    ("limit 0", "/search", {"userEmail": user, "query": "ledger", "options": {"limit": 0}, "transactionToken": token}, 400),
    ("huge limit", "/search", {"userEmail": user, "query": "ledger", "options": {"limit": 10**9}, "transactionToken": token}, 400),
    ("threshold", "/search", {"userEmail": user, "query": "ledger", "options": {"similarityThreshold": 1.5}, "transactionToken": token}, 400),
    ("no payer", "/search", {"query": "ledger", "transactionToken": token}, 400),
    ("no messages", "/chat", {"userEmail": user, "model": "m", "messages": [], "transactionToken": token}, 400),
    ("not json", "/chat", None, 400),
]
for name, path, body, want in refusals:
    if body is None:
        req = urllib.request.Request(url + path, data=b"{oops", method="POST")
        try:
            urllib.request.urlopen(req, timeout=30)
            status, answer = 200, {}
        except urllib.error.HTTPError as e:
            status, answer = e.code, json.loads(e.read())
    else:
        status, answer = call("POST", path, body)
    check(status == want, f"{name}: {status} {answer}, want {want}")
    check(isinstance(answer.get("detail"), str) and answer.get("code"), f"{name}: error body {answer}")

print("router api: ok")
