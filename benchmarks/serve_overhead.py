"""Where the time goes between an HTTP client and the model: a 1-token completion, layer by layer.

    direct      the engine call in-process (tokenized prompt -> 1 greedy token)
    asgi        the raylm FastAPI app in-process (httpx ASGITransport): middleware, pydantic,
                admission thread, scheduler hop, JSON -- no Ray
    echo        a bare FastAPI ingress deployment through Serve (proxy, router, replica, no model)
    serve       the raylm app through Serve

overhead_ms = p50(serve) - p50(direct), with the default Serve settings; echo_ms is Serve's own share,
app_ms = p50(asgi) - p50(direct) ours. Then each Ray Serve request-path switch is measured the same way
in a fresh Ray (they are read when Serve's processes start): RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0,
RAY_SERVE_ENABLE_DIRECT_INGRESS=1, RAY_SERVE_THROUGHPUT_OPTIMIZED=1, RAY_SERVE_ENABLE_HA_PROXY=1 (needs
the haproxy binary). Sequential requests, one client, medians.

    python -m benchmarks.serve_overhead [--requests 300] [--variants default direct_ingress ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HTTP_PORT = 18041
API_KEY = "bench-key"
PROMPT = "How do I reset my password?"
BODY = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
VARIANTS = {
    "default": {},
    "user_code_on_main_loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
    "direct_ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "ha_proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p99_ms(samples: list[float]) -> float:
    return sorted(samples)[min(len(samples) - 1, int(0.99 * len(samples)))] * 1000


def timed(fn, requests: int, warmup: int = 20) -> list[float]:
    samples = []
    for i in range(requests + warmup):
        started = time.perf_counter()
        fn()
        if i >= warmup:
            samples.append(time.perf_counter() - started)
    return samples


def serving_args(export_dir: Path) -> dict:
    from serving.args import ServingArgs

    return ServingArgs(export_dir=str(export_dir), torch_threads=1, max_batch_size=8, batch_wait_timeout_s=0.0).model_dump()


def measure_in_process(export_dir: Path, requests: int) -> dict[str, float]:
    """direct and asgi: no Ray involved."""
    import httpx
    import torch

    from serving.app import CausalLMServer
    from serving.export_format import read_export
    from serving.generation import CausalLMEngine, GenerationJob, SamplingParams

    torch.set_num_threads(1)
    engine = CausalLMEngine(read_export(export_dir))
    one_token = SamplingParams(max_tokens=1, temperature=0.0)

    def direct_call():
        engine.generate([GenerationJob(engine.encode(PROMPT), one_token)])

    try:
        # The class under Serve's ingress wrapper (whose async __init__ needs a replica).
        user_class = next(c for c in CausalLMServer.func_or_class.__mro__ if "__serve_build_asgi_app__" in vars(c))
        server = user_class(serving_args(export_dir))
        app = server.__serve_build_asgi_app__()
    except Exception as exc:  # e.g. metrics that need a replica context
        return {"direct_p50_ms": p50_ms(timed(direct_call, requests)), "asgi_error": f"{type(exc).__name__}: {exc}"}

    async def run() -> tuple[list[float], list[float]]:
        """direct and asgi alternate, so that both see the same machine load."""
        transport = httpx.ASGITransport(app=app)
        direct, asgi = [], []
        async with httpx.AsyncClient(transport=transport, base_url="http://app",
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            for i in range(requests + 20):
                started = time.perf_counter()
                direct_call()
                middle = time.perf_counter()
                response = await client.post("/v1/completions", json=BODY)
                ended = time.perf_counter()
                assert response.status_code == 200, response.text
                if i >= 20:
                    direct.append(middle - started)
                    asgi.append(ended - middle)
        return direct, asgi

    direct, asgi = asyncio.run(run())
    server.scheduler.stop()
    return {"direct_p50_ms": p50_ms(direct), "asgi_p50_ms": p50_ms(asgi)}


def measure_serve(export_dir: Path, requests: int) -> dict[str, float]:
    """echo and serve through a fresh local Ray; the variant's env vars are already in os.environ."""
    import httpx
    import ray
    from fastapi import FastAPI
    from ray import serve

    from serving.app import CausalLMServer

    echo_api = FastAPI()

    @echo_api.post("/v1/completions")
    async def echo(body: dict) -> dict:
        return {"choices": [{"text": "x"}], "usage": {"completion_tokens": 1}}

    @serve.deployment(name="Echo")
    @serve.ingress(echo_api)
    class Echo:
        pass

    figures: dict[str, float] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        for label, app in (("echo", Echo.bind()),
                           ("serve", CausalLMServer.options(num_replicas=1).bind(serving_args(export_dir)))):
            # One app at a time on "/": with direct ingress the replica itself answers on the HTTP port.
            serve.run(app, name=label, route_prefix="/")
            with httpx.Client(base_url=f"http://127.0.0.1:{HTTP_PORT}", timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"}) as client:
                deadline = time.monotonic() + 60
                while client.post("/v1/completions", json=BODY).status_code != 200 and time.monotonic() < deadline:
                    time.sleep(0.5)

                def one():
                    response = client.post("/v1/completions", json=BODY)
                    assert response.status_code == 200, response.text

                samples = timed(one, requests)
            figures[f"{label}_p50_ms"] = p50_ms(samples)
            figures[f"{label}_p99_ms"] = p99_ms(samples)
            serve.delete(label)
    finally:
        serve.shutdown()
        ray.shutdown()
    return figures


def run_variant(name: str, export_dir: Path, requests: int) -> dict:
    """A variant in its own process, so that Ray's processes start with its env vars."""
    if name == "ha_proxy" and shutil.which("haproxy") is None:
        return {"skipped": "haproxy binary not installed (RAY_SERVE_ENABLE_HA_PROXY runs it)"}
    env = {**os.environ, **VARIANTS[name]}
    out = Path(tempfile.mkdtemp(prefix="raylm-overhead-")) / "variant.json"
    command = [sys.executable, "-m", "benchmarks.serve_overhead", "--one-variant", name, "--export-dir",
               str(export_dir), "--requests", str(requests), "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 or not out.exists():
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--one-variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAYLM_API_KEYS"] = API_KEY
    if args.one_variant:
        Path(args.out).write_text(json.dumps(measure_serve(Path(args.export_dir), args.requests)))
        return

    from serving.tiny_exports import build_causal_lm_export

    with open("/proc/loadavg") as handle:
        load_before = float(handle.read().split()[0])
    export_dir = build_causal_lm_export(Path(tempfile.mkdtemp(prefix="raylm-overhead-")) / "export")
    figures: dict = measure_in_process(export_dir, args.requests)
    direct = figures["direct_p50_ms"]
    print(f"direct engine call, 1 token: p50 {direct:.2f} ms")
    if "asgi_p50_ms" in figures:
        figures["app_ms"] = figures["asgi_p50_ms"] - direct
        print(f"raylm FastAPI app in-process: p50 {figures['asgi_p50_ms']:.2f} ms (app share {figures['app_ms']:.2f} ms)")
    variants = {}
    for name in args.variants:
        result = run_variant(name, export_dir, args.requests)
        if "serve_p50_ms" in result:
            result["overhead_ms"] = result["serve_p50_ms"] - direct
        variants[name] = result
        print(f"{name:<24} {json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()})}",
              flush=True)
    with open("/proc/loadavg") as handle:
        load_after = float(handle.read().split()[0])
    default = variants.get("default", {})
    overhead = default.get("overhead_ms", float("nan"))
    best = min((v["overhead_ms"], k) for k, v in variants.items() if "overhead_ms" in v) if any(
        "overhead_ms" in v for v in variants.values()) else (float("nan"), "none")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_overhead.json").write_text(json.dumps(
        {**figures, "variants": variants, "overhead_ms": overhead, "echo_ms": default.get("echo_p50_ms"),
         "best_variant": best[1], "best_overhead_ms": best[0], "requests": args.requests,
         "load_average_1m": {"before": load_before, "after": load_after}, "target": {"overhead_ms": 3.0}}, indent=2))
    print(f"overhead_ms={overhead:.2f} echo_ms={default.get('echo_p50_ms', float('nan')):.2f} "
          f"app_ms={figures.get('app_ms', float('nan')):.2f} best_variant={best[1]} best_overhead_ms={best[0]:.2f} "
          f"load={load_before:.0f}->{load_after:.0f}")


if __name__ == "__main__":
    main()
