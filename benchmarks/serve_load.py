"""Closed-loop load against (a) Serve with batching, (b) Serve without (max_batch_size=1), and
(c) a plain FastAPI/uvicorn + transformers server written the way a user would (generate per request).

Each of `concurrency` clients sends greedy completions (max_tokens tokens) back to back; we record
requests/s, p50/p99 latency and generated tokens/s at concurrency 1, 8 and 32. One replica, the same
torch thread count everywhere. Model: a small random-init Llama export (hidden 256, 4 layers) by
default, or `--model smollm2` for SmolLM2-135M-Instruct (see benchmarks.quantization for the cache).

    python -m benchmarks.serve_load [--threads 2] [--max-tokens 16] [--model small|smollm2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SERVE_PORT = 18045
NAIVE_PORT = 18046
API_KEY = "bench-key"

NAIVE_SERVER = textwrap.dedent('''
    # The server a user writes without Serve: one process, transformers generate per request.
    import sys, torch
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import uvicorn

    export_dir, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    app = FastAPI()

    class Completion(BaseModel):
        model: str
        prompt: str
        max_tokens: int = 16
        temperature: float = 0.0

    @app.post("/v1/completions")
    def complete(request: Completion):
        inputs = tokenizer(request.prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=request.max_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        new = output[0, inputs["input_ids"].shape[1]:]
        return {"choices": [{"text": tokenizer.decode(new, skip_special_tokens=True)}],
                "usage": {"completion_tokens": int(new.numel())}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
''')


def prompts() -> list[str]:
    from serving.tiny_exports import real_text_lines

    return [line[: 40 + (i * 37) % 160] for i, line in enumerate(real_text_lines(200)[::3])]


async def closed_loop(url: str, model: str, concurrency: int, total: int, max_tokens: int) -> dict:
    import httpx

    texts = prompts()
    latencies: list[float] = []
    tokens = 0
    next_index = 0

    async def client_loop(client):
        nonlocal tokens, next_index
        while next_index < total:
            i = next_index
            next_index += 1
            body = {"model": model, "prompt": texts[i % len(texts)], "max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            response = await client.post(url, json=body)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        await client.post(url, json={"model": model, "prompt": "warm up", "max_tokens": 2, "temperature": 0})
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests_per_s": total / elapsed, "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
            "tokens_per_s": tokens / elapsed, "requests": total}


def wait_http(url: str, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", choices=["small", "smollm2"], default="small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAYLM_API_KEYS"] = API_KEY
    import ray
    from ray import serve

    from serving.app import CausalLMServer
    from serving.args import ServingArgs
    from serving.export_format import read_export

    workdir = Path(tempfile.mkdtemp(prefix="raylm-load-"))
    if args.model == "smollm2":
        from benchmarks.quantization import smollm2_export

        export_dir = smollm2_export()
    else:
        from serving.tiny_exports import build_causal_lm_export

        export_dir = build_causal_lm_export(workdir / "export", hidden_size=256, num_layers=4, vocab_size=1024,
                                            initializer_range=0.05)
    model_name = read_export(export_dir).manifest.model_name
    requests_at = {c: max(16, 3 * c) for c in args.concurrency}
    results: dict[str, dict] = {}

    naive = subprocess.Popen([sys.executable, "-c", NAIVE_SERVER, str(export_dir), str(NAIVE_PORT), str(args.threads)],
                             start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{NAIVE_PORT}/docs")
        for c in args.concurrency:
            results[f"naive_c{c}"] = asyncio.run(closed_loop(
                f"http://127.0.0.1:{NAIVE_PORT}/v1/completions", model_name, c, requests_at[c], args.max_tokens))
            print(f"naive     c={c:>2}: {json.dumps({k: round(v, 2) for k, v in results[f'naive_c{c}'].items()})}", flush=True)
    finally:
        naive.terminate()
        naive.wait(30)

    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
        for label, batch_size in (("batched", 32), ("unbatched", 1)):
            serving_args = ServingArgs(export_dir=str(export_dir), torch_threads=args.threads, max_batch_size=batch_size,
                                       batch_wait_timeout_s=0.005).model_dump()
            deployment = CausalLMServer.options(num_replicas=1, max_ongoing_requests=64,
                                                ray_actor_options={"num_cpus": args.threads})
            serve.run(deployment.bind(serving_args), name=label, route_prefix=f"/{label}")
            for c in args.concurrency:
                results[f"{label}_c{c}"] = asyncio.run(closed_loop(
                    f"http://127.0.0.1:{SERVE_PORT}/{label}/v1/completions", model_name, c, requests_at[c], args.max_tokens))
                print(f"{label:<9} c={c:>2}: {json.dumps({k: round(v, 2) for k, v in results[f'{label}_c{c}'].items()})}",
                      flush=True)
            serve.delete(label)
    finally:
        serve.shutdown()
        ray.shutdown()

    top = max(args.concurrency)
    batch_speedup = results[f"batched_c{top}"]["tokens_per_s"] / results[f"unbatched_c{top}"]["tokens_per_s"]
    vs_naive = results[f"batched_c{top}"]["tokens_per_s"] / results[f"naive_c{top}"]["tokens_per_s"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(
        {"model": args.model, "threads": args.threads, "max_tokens": args.max_tokens, "results": results,
         f"batch_speedup_c{top}": batch_speedup, f"vs_naive_c{top}": vs_naive,
         "target": {f"batch_speedup_c{top}": 5, f"vs_naive_c{top}": 2}}, indent=2))
    print(f"batch_speedup_c{top}={batch_speedup:.2f} vs_naive_c{top}={vs_naive:.2f} "
          f"p99_ms_c{top}={results[f'batched_c{top}']['p99_ms']:.1f}")


if __name__ == "__main__":
    main()
