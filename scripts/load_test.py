#!/usr/bin/env python3
"""Load test for an OpenAI-compatible server: N concurrent streaming clients, R requests each.

Standard library only. Every client thread sends its requests one after another with
`stream: true` and `stream_options.include_usage`, reads the server-sent events, and records the
time to the first token, the tokens streamed and the usage reported. Prints one JSON summary line:
requests, errors, aggregate generated tokens/s, time-to-first-token p50/p99.

With --strict (how Kiln's tests run it) the run fails unless every request succeeded, every stream
ended with `data: [DONE]`, and the number of token chunks equals `usage.completion_tokens`.

    python3 scripts/load_test.py --base-url http://127.0.0.1:8000/v1 --clients 16 --requests 2
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about compilers are",
    "Here is a short story about a robot who learns to paint:",
    "In the year 2150, the first city on Mars",
    "A recipe for a simple tomato soup:",
    "The history of the printing press begins",
    "Dear diary, today I finally",
    "Ten reasons to learn a second language:",
]


def one_request(base, args, client, index):
    """Runs one streamed request; returns a dict of what happened."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=args.timeout)
    prompt = PROMPTS[(client * args.requests + index) % len(PROMPTS)]
    body = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": client * 1000 + index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = url.path.rstrip("/") + "/chat/completions"
    else:
        body["prompt"] = prompt
        path = url.path.rstrip("/") + "/completions"
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = "Bearer " + args.api_key
    result = {"ok": False, "ttft": None, "chunks": 0, "usage": None, "done": False, "error": None,
              "finish": None}
    start = time.perf_counter()
    try:
        conn.request("POST", path, json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            result["error"] = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return result
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                result["done"] = True
                break
            event = json.loads(payload)
            if "error" in event:
                result["error"] = event["error"].get("message")
                continue
            if event.get("usage"):
                result["usage"] = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("finish_reason"):
                    result["finish"] = choice["finish_reason"]
                delta = choice.get("delta", choice)
                has_token = "text" in choice or "content" in delta
                if choice.get("finish_reason") is None and has_token:
                    if args.chat and delta.get("role") and not delta.get("content"):
                        continue  # the role chunk carries no token
                    result["chunks"] += 1
                    if result["ttft"] is None:
                        result["ttft"] = time.perf_counter() - start
        result["ok"] = result["done"] and result["error"] is None
    except Exception as e:  # noqa: BLE001 - every failure is reported, none is fatal
        result["error"] = repr(e)
    finally:
        conn.close()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--chat", action="store_true", help="use /chat/completions")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--strict", action="store_true", help="fail on any error or usage mismatch")
    args = p.parse_args()

    if args.model is None:
        url = urllib.parse.urlparse(args.base_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        headers = {"Authorization": "Bearer " + args.api_key} if args.api_key else {}
        conn.request("GET", url.path.rstrip("/") + "/models", headers=headers)
        args.model = json.loads(conn.getresponse().read())["data"][0]["id"]

    results = [[] for _ in range(args.clients)]

    def client(c):
        for i in range(args.requests):
            results[c].append(one_request(args.base_url, args, c, i))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start

    flat = [r for rs in results for r in rs]
    errors = [r["error"] or "stream did not end with [DONE]" for r in flat if not r["ok"]]
    mismatched = [
        r for r in flat
        if r["ok"] and (r["usage"] is None or r["usage"]["completion_tokens"] != r["chunks"])
    ]
    tokens = sum((r["usage"] or {}).get("completion_tokens", r["chunks"]) for r in flat if r["ok"])
    ttfts = sorted(r["ttft"] for r in flat if r["ttft"] is not None)

    def pct(q):
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None

    summary = {
        "clients": args.clients,
        "requests": len(flat),
        "errors": len(errors),
        "usage_mismatches": len(mismatched),
        "all_done": all(r["done"] for r in flat),
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": pct(0.5) and round(pct(0.5), 3),
        "ttft_p99_s": pct(0.99) and round(pct(0.99), 3),
        "ttft_mean_s": ttfts and round(statistics.mean(ttfts), 3),
        "finish_reasons": {f: sum(r["finish"] == f for r in flat) for f in {r["finish"] for r in flat}},
    }
    print(json.dumps(summary))
    if errors:
        print("first errors: " + "; ".join(errors[:3]), file=sys.stderr)
    if args.strict and (errors or mismatched or not summary["all_done"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
