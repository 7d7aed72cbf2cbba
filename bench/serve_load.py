"""Load test for `tinyllm serve`: N concurrent clients on loopback; throughput, latency, and answer integrity.

    python bench/serve_load.py --model out/sft --clients 1,8 --requests 4 --max-tokens 64
    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 8      # a server that is already running

Every request is a greedy /v1/completions call with `echo: true` and a prompt that carries its own id. Before the load
phase each prompt is answered alone, one at a time; under load every answer must start with its own prompt (echo) and
equal that solo answer token for token, so a lost, swapped or batch-corrupted response is counted, never hidden.
Reports requests/s, p50/p95 latency, completion tokens/s per client count, and the ratio to a single client.
Loopback only: the script refuses any other host.
"""

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # serve_fixtures.run_uvicorn for --model

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOPICS = ["这本书", "人际关系的技巧", "今天的天气", "学习中文", "一首诗", "旅行的意义", "做饭", "音乐"]


def prompt_for(client: int, index: int) -> str:
    return f"[请求 {client}-{index}] {TOPICS[(client + index) % len(TOPICS)]}"


async def complete(http: httpx.AsyncClient, prompt: str, max_tokens: int, model: str) -> tuple[dict, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "echo": True}
    started = time.perf_counter()
    response = await http.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return response.json(), elapsed


async def reference_answers(url: str, prompts: list[str], max_tokens: int, model: str) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        return {p: (await complete(http, p, max_tokens, model))[0]["choices"][0]["text"] for p in prompts}


async def load(url: str, clients: int, requests: int, max_tokens: int, model: str, expected: dict[str, str]) -> dict:
    latencies, tokens, problems = [], 0, []

    async def client(c: int, http: httpx.AsyncClient):
        nonlocal tokens
        for i in range(requests):
            prompt = prompt_for(c, i)
            try:
                body, elapsed = await complete(http, prompt, max_tokens, model)
            except (httpx.HTTPError, ValueError) as exc:
                problems.append(f"{prompt}: lost ({type(exc).__name__}: {exc})")
                continue
            text = body["choices"][0]["text"]
            if not text.startswith(prompt):
                problems.append(f"{prompt}: answered another request ({text[:40]!r})")
            elif text != expected[prompt]:
                problems.append(f"{prompt}: differs from its solo answer")
            latencies.append(elapsed)
            tokens += body["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients,
        "requests": clients * requests,
        "ok": len(latencies),
        "problems": problems,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3) if latencies else None,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
    }


def run(url: str, client_counts: list[int], requests: int, max_tokens: int) -> list[dict]:
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    prompts = sorted({prompt_for(c, i) for c in range(max(client_counts)) for i in range(requests)})
    expected = asyncio.run(reference_answers(url, prompts, max_tokens, model))
    results = [asyncio.run(load(url, n, requests, max_tokens, model, expected)) for n in client_counts]
    base = next((r["tokens_per_s"] for r in results if r["clients"] == 1), None)
    for r in results:
        r["speedup_vs_1_client"] = round(r["tokens_per_s"] / base, 2) if base else None
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server on loopback")
    target.add_argument("--model", help="start `tinyllm serve` in-process on this checkpoint / file")
    parser.add_argument("--backend", default="auto", help="as `tinyllm serve --backend` (default: auto)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="CPU threads per decode step (default: the runtime's)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts to run, e.g. 1,4,8")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    client_counts = [int(n) for n in args.clients.split(",")]

    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            parser.error(f"--url must be on loopback ({', '.join(LOOPBACK)}), got {args.url}")
        results = run(args.url.rstrip("/"), client_counts, args.requests, args.max_tokens)
    else:
        from serve_fixtures import run_uvicorn

        from tinyllm_hf.inference.engine import Engine
        from tinyllm_hf.inference.runtime import load_backend
        from tinyllm_hf.inference.server import build_app

        backend = load_backend(args.backend, args.model, threads=args.threads, streams=args.max_batch_size)
        engine = Engine(backend, max_batch_size=args.max_batch_size)
        try:
            with run_uvicorn(build_app(engine, Path(args.model).name)) as url:
                results = run(url, client_counts, args.requests, args.max_tokens)
        finally:
            engine.close()

    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
              "backend": backend.backend if args.model else args.backend,
              "max_tokens": args.max_tokens,
              "results": results}
    print(json.dumps(report, ensure_ascii=False, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
