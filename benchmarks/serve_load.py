"""Closed-loop load against (a) Serve with continuous batching (max_batch_size 32), (b) the same replica
with max_batch_size 1, and (c) a plain FastAPI/uvicorn + transformers server written the way a user
would (generate per request, no streaming).

Each of `concurrency` clients sends greedy completions (max_tokens tokens) back to back; the Serve
sides stream (SSE), which gives time to first token. We record requests/s, p50/p99 latency, TTFT and
generated tokens/s at concurrency 1 and 32 (1,024 requests at c=32); the three sides run one at a time,
interleaved at each level. One replica; the same torch thread count and core count everywhere. Model: a small random-init Llama export (hidden 256, 4 layers) by
default, or `--model smollm2` for SmolLM2-135M-Instruct (see benchmarks.quantization for the cache).

Where the gap to the in-process decode loop goes: each HTTP side's run also records the CPU seconds every
process on the machine spent per request (replica, HAProxy, Serve's proxy and controller, the clients in this
process, Ray's own daemons), and after the HTTP sides the same scheduler runs in this process with the same
requests and no HTTP at all (`engine_c*`): the batching speedup the model thread alone gives, prefill and
joins included, which bounds what any request path can show.

    python -m benchmarks.serve_load [--threads 1] [--max-tokens 16] [--model small|smollm2] [--concurrency 1 8 32]
        [--join-wait-s 0.02 0.05]   # extra batched replicas with ServingArgs.join_wait_s
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


async def closed_loop(url: str, model: str, concurrency: int, total: int, max_tokens: int, stream: bool) -> dict:
    """`concurrency` clients send `total` greedy completions back to back. With `stream` the response is
    read as server-sent events and the time to the first token chunk is recorded."""
    import httpx

    texts = prompts()
    latencies: list[float] = []
    first_token: list[float] = []
    tokens = 0
    next_index = 0

    async def one(client, body) -> int:
        started = time.perf_counter()
        if not stream:
            response = await client.post(url, json=body)
            assert response.status_code == 200, response.text
            latencies.append(time.perf_counter() - started)
            return response.json()["usage"]["completion_tokens"]
        usage, first = None, None
        async with client.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter() - started
                usage = chunk.get("usage") or usage
        latencies.append(time.perf_counter() - started)
        first_token.append(first if first is not None else latencies[-1])
        return usage["completion_tokens"]

    async def client_loop(client):
        nonlocal tokens, next_index
        while next_index < total:
            i = next_index
            next_index += 1
            # Awaited first, then added: `tokens += await ...` reads `tokens` before the await, so
            # concurrent clients would overwrite each other's counts.
            generated = await one(client, {"model": model, "prompt": texts[i % len(texts)], "max_tokens": max_tokens,
                                           "temperature": 0})
            tokens += generated

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        await client.post(url, json={"model": model, "prompt": "warm up", "max_tokens": 2, "temperature": 0})
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    result = {"requests_per_s": total / elapsed, "p50_ms": percentile(latencies, 0.5) * 1000,
              "p99_ms": percentile(latencies, 0.99) * 1000, "max_ms": max(latencies) * 1000,
              "tokens_per_s": tokens / elapsed, "requests": total}
    if first_token:
        result["ttft_p50_ms"] = percentile(first_token, 0.5) * 1000
        result["ttft_p99_ms"] = percentile(first_token, 0.99) * 1000
    return result


def process_cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of every process on the machine, named by its role: this
    benchmark's processes (this one and its descendants: Ray's daemons and workers, HAProxy, the naive
    server) by what they are, every other process on the machine as one role."""
    ticks = os.sysconf("SC_CLK_TCK")
    found, parents = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry.name)] = int(fields[1])
        found[int(entry.name)] = (cmdline or stat.split("(", 1)[1].split(")")[0], (int(fields[11]) + int(fields[12])) / ticks)

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return {pid: (process_role(pid, cmdline) if ours(pid) else "not this benchmark's processes", seconds)
            for pid, (cmdline, seconds) in found.items()}


def process_role(pid: int, cmdline: str) -> str:
    """Which part of the request path (or of the machine) a process is."""
    if pid == os.getpid():
        return "clients (this process)"
    for marker, role in (("ServeReplica:batched", "replica (batched)"), ("ServeReplica:unbatched", "replica (unbatched)"),
                         ("haproxy", "haproxy"), ("ProxyActor", "serve proxy"), ("ServeController", "serve controller"),
                         ("raylet", "raylet"), ("gcs_server", "gcs"),
                         ("The server a user writes without Serve", "naive server"), ("ray::", "other ray workers"),
                         ("dashboard", "ray dashboard/agents"), ("runtime_env", "ray dashboard/agents"),
                         ("log_monitor", "ray dashboard/agents"), ("monitor.py", "ray dashboard/agents")):
        if marker in cmdline:
            return role
    return "other processes of this benchmark"


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """CPU milliseconds per request spent by each role between two process_cpu_seconds() snapshots."""
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        delta = seconds - before.get(pid, (role, 0.0))[1]
        if delta > 0:
            spent[role] = spent.get(role, 0.0) + delta
    return {role: round(1000 * seconds / requests, 2) for role, seconds in sorted(spent.items(), key=lambda kv: -kv[1])}


async def engine_closed_loop(scheduler, engine, concurrency: int, total: int, max_tokens: int) -> dict:
    """The same closed loop as `closed_loop`, straight into a scheduler in this process: no HTTP, no Serve."""
    from serving.generation import GenerationJob, SamplingParams

    texts = prompts()
    ids = [engine.encode(t) for t in texts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tokens, next_index = 0, 0

    async def client_loop():
        nonlocal tokens, next_index
        while next_index < total:
            i = next_index
            next_index += 1
            async for event in scheduler.events(GenerationJob(ids[i % len(ids)], params)):
                tokens += event.generated

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"requests_per_s": total / elapsed, "tokens_per_s": tokens / elapsed, "requests": total}


def engine_ceiling(export_dir, threads: int, levels: dict[int, int], max_tokens: int) -> dict[str, dict]:
    """Batched (32) and unbatched (1) schedulers on one engine in this process, each level interleaved."""
    import torch

    from serving.export_format import read_export
    from serving.generation import CausalLMEngine
    from serving.scheduler import Scheduler

    engine = CausalLMEngine(read_export(export_dir))
    init = lambda: torch.set_num_threads(threads)  # noqa: E731 - the replica's _init_model_thread does the same
    schedulers = {"engine_batched": Scheduler(engine, max_batch_size=32, init_thread=init),
                  "engine_unbatched": Scheduler(engine, max_batch_size=1, init_thread=init)}
    results = {}
    try:
        for c, total in levels.items():
            for label, scheduler in schedulers.items():
                results[f"{label}_c{c}"] = asyncio.run(engine_closed_loop(scheduler, engine, c, total, max_tokens))
                print(f"{label:<16} c={c:>2}: {json.dumps({k: round(v, 2) for k, v in results[f'{label}_c{c}'].items()})}",
                      flush=True)
    finally:
        for scheduler in schedulers.values():
            scheduler.stop()
    from benchmarks.decode_costs import request_costs

    torch.set_num_threads(threads)
    results["model_thread"] = request_costs(engine, [engine.encode(text) for text in prompts()], max_tokens)
    print(f"model thread, CPU ms per request: {json.dumps({k: round(v, 2) for k, v in results['model_thread'].items()})}",
          flush=True)
    return results


def small_export(directory: Path) -> Path:
    """The benchmark's default model: a random-init Llama export (hidden 256, 4 layers, vocab 1,024)."""
    from serving.tiny_exports import build_causal_lm_export

    return build_causal_lm_export(directory / "export", hidden_size=256, num_layers=4, vocab_size=1024,
                                  initializer_range=0.05)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load_average() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


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
    # One core per replica, as the shipped Serve configs give it (num_cpus: 1). On a 2-core machine a
    # replica with 2 intra-op threads shares both cores with the proxy and the client, and every torch
    # op waits for its preempted second thread: a batch-32 decode step measured 10-320 ms at 2 threads
    # against 11-24 ms at 1 on the same loaded machine.
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (and cores) of the replica and of the naive server")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", choices=["small", "smollm2"], default="small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests-per-client", type=int, default=32,
                        help="requests per level = max(50, this x concurrency): 1,024 at c=32, so p99 is not the max")
    parser.add_argument("--join-wait-s", type=float, nargs="*", default=[],
                        help="extra batched replicas whose arrivals wait up to this long to join a decoding batch "
                             "(ServingArgs.join_wait_s), run interleaved with the others as batched_join<s>")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAYLM_API_KEYS"] = API_KEY
    import ray
    from ray import serve

    from serving.app import CausalLMServer
    from serving.args import ServingArgs
    from serving.export_format import read_export
    from serving.ingress import node_env

    # The request path raylm ships (HAProxy where its binary runs, else Serve's Python proxy): Ray's
    # processes read these when they start, so they go into this process's environment before ray.init.
    shipped_env = node_env()
    os.environ.update(shipped_env)
    path = "haproxy" if shipped_env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "python"

    workdir = Path(tempfile.mkdtemp(prefix="raylm-load-"))
    if args.model == "smollm2":
        from benchmarks.quantization import smollm2_export

        export_dir = smollm2_export()
    else:
        export_dir = small_export(workdir)
    model_name = read_export(export_dir).manifest.model_name
    requests_at = {c: max(50, args.requests_per_client * c) for c in args.concurrency}
    results: dict[str, dict] = {}
    load_before = load_average()

    # The naive server gets the same CPU budget as the replica: `threads` torch threads, and (where the
    # machine has more cores) the same number of cores.
    cores = sorted(os.sched_getaffinity(0))[: args.threads]
    naive = subprocess.Popen([sys.executable, "-c", NAIVE_SERVER, str(export_dir), str(NAIVE_PORT), str(args.threads)],
                             start_new_session=True, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    ray.init(num_cpus=(2 + len(args.join_wait_s)) * args.threads, include_dashboard=False, log_to_driver=False)
    try:
        wait_http(f"http://127.0.0.1:{NAIVE_PORT}/docs")
        serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
        # Both Serve variants stay up (an idle replica's scheduler thread sleeps) so that the three
        # sides run interleaved, one at a time, at every concurrency level.
        variants = [("batched", 32, 0.0), ("unbatched", 1, 0.0)]
        variants += [(f"batched_join{wait:g}", 32, wait) for wait in args.join_wait_s]
        for label, batch_size, join_wait_s in variants:
            serving_args = ServingArgs(export_dir=str(export_dir), torch_threads=args.threads, max_batch_size=batch_size,
                                       batch_wait_timeout_s=0.0, join_wait_s=join_wait_s).model_dump()
            deployment = CausalLMServer.options(num_replicas=1, max_ongoing_requests=64,
                                                ray_actor_options={"num_cpus": args.threads})
            serve.run(deployment.bind(serving_args), name=label, route_prefix=f"/{label}")
        urls = {"naive": f"http://127.0.0.1:{NAIVE_PORT}/v1/completions",
                **{label: f"http://127.0.0.1:{SERVE_PORT}/{label}/v1/completions" for label, _, _ in variants}}
        for c in args.concurrency:
            for label, url in urls.items():
                cpu_before = process_cpu_seconds()
                results[f"{label}_c{c}"] = asyncio.run(closed_loop(
                    url, model_name, c, requests_at[c], args.max_tokens, stream=label != "naive"))
                results[f"{label}_c{c}"]["cpu_ms_per_request"] = cpu_per_request(cpu_before, process_cpu_seconds(),
                                                                                 requests_at[c])
                print(f"{label:<9} c={c:>2}: {json.dumps({k: round(v, 2) for k, v in results[f'{label}_c{c}'].items() if k != 'cpu_ms_per_request'})}"
                      f"\n{'':<9} CPU ms per request: {results[f'{label}_c{c}']['cpu_ms_per_request']}", flush=True)
    finally:
        naive.terminate()
        naive.wait(30)
        serve.shutdown()
        ray.shutdown()
    results.update(engine_ceiling(export_dir, args.threads, requests_at, args.max_tokens))

    top, low = max(args.concurrency), min(args.concurrency)
    figures = {
        f"batch_speedup_c{top}": results[f"batched_c{top}"]["tokens_per_s"] / results[f"unbatched_c{top}"]["tokens_per_s"],
        f"vs_naive_c{top}": results[f"batched_c{top}"]["tokens_per_s"] / results[f"naive_c{top}"]["tokens_per_s"],
        f"ttft_p50_ms_c{low}": results[f"batched_c{low}"]["ttft_p50_ms"],
        f"ttft_p50_ms_c{top}": results[f"batched_c{top}"]["ttft_p50_ms"],
        f"p99_ms_c{top}": results[f"batched_c{top}"]["p99_ms"],
        # What the model thread alone gives from batching (no HTTP): the bound on batch_speedup.
        f"engine_batch_speedup_c{top}": (results[f"engine_batched_c{top}"]["tokens_per_s"]
                                         / results[f"engine_unbatched_c{top}"]["tokens_per_s"]),
        # A request's model-thread CPU alone / in a batch of 32 (benchmarks.decode_costs): no scheduler, no HTTP.
        "model_bound_b32": results["model_thread"]["bound"],
    }
    for wait in args.join_wait_s:
        figures[f"join{wait:g}_speedup_c{top}"] = (results[f"batched_join{wait:g}_c{top}"]["tokens_per_s"]
                                                   / results[f"batched_c{top}"]["tokens_per_s"])
    load_after = load_average()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(
        {"model": args.model, "threads": args.threads, "max_tokens": args.max_tokens, "request_path": path,
         "results": results, **figures,
         "load_average_1m": {"before": load_before, "after": load_after},
         "target": {f"batch_speedup_c{top}": 5, f"vs_naive_c{top}": 2}}, indent=2))
    print(" ".join(f"{k}={v:.2f}" for k, v in figures.items()) + f" request_path={path} "
          f"load={load_before:.0f}->{load_after:.0f}")


if __name__ == "__main__":
    main()
